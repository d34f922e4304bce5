"""prep: a folder of class-sorted images in, a packaged and verified dataset out.

Architecture (data flows one way, top to bottom; no module imports one above it)::

    cli.py          parse options, build a stage config, call the stage, report
    cli_support.py  what every command shares: errors as one line, --json, the lock, prep.toml
    config.py       defaults from prep.toml / [tool.prep], checked against the CLI's options
    stages/         one module per command: sample, index, resize, split, encode, pack, verify,
                    train (verify-train), report and card, status; facts.py gathers what the
                    report and the card both show
    templates/      the report page and the dataset card, as Jinja2 templates
    loaders.py      the public load API (load, load_tf, load_torch, load_classes, load_frame);
                    verify-train uses it too
    imaging.py      the pure per-image transform: bytes in, 8-bit pixels or a reason out
    spec.py         the resize settings (what decides the pixels), without imaging's imports
    nearcopy.py     perceptual hashes of an image, and the search for near copies among them
    executors.py    serial / local processes / Dask behind concurrent.futures.Executor
    sources.py      listing and reading the RAW tree, a folder or an fsspec URL
    remote.py       a work directory at a URL: a local copy, fetched before a command, uploaded after
    record.py       that copy's record in SQLite: what it holds, as fetched or uploaded
    checks.py       warnings about the data (folders, class counts, source sizes), kept in index.json
    manifest.py     manifest.json: settings, counts, class weights and checksums of what was packaged
    workdir.py      the work directory's files, atomic writes, CSV/JSON, locks, up-to-date stamps
    formats/        pkl.gz, h5, tfrecord, parquet: a writer and readers each, in one registry
    errors.py       the exceptions the CLI prints as one-line messages
"""

__version__ = "0.1.0"


# The load API is imported on first call, so `import pipeline` stays light.
def load(path):
    """((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) from a pkl.gz, h5, tfrecord/ or work directory.

    Safe on a file from anyone: a pkl.gz is unpickled into numpy arrays and nothing else (a pickle
    that names any other callable is refused, none of it run), and every format's shapes and dtypes
    are checked (a PrepError naming the file and split otherwise)."""
    from .loaders import load

    return load(path)


def load_tf(path, split="train"):
    """A tf.data.Dataset of (uint8 H x W x C image, int64 label) for one split of a packaged dataset."""
    from .loaders import load_tf

    return load_tf(path, split)


def load_classes(path):
    """The class names (label id = position) of a packaged dataset or work directory."""
    from .loaders import load_classes

    return load_classes(path)


def load_torch(path, split="train", transform=None):
    """A map-style dataset of one split for torch.utils.data.DataLoader: ds[i] -> (uint8 H x W x C
    numpy image, or transform(image), int label), from Parquet, h5 or pkl.gz; torch is not imported."""
    from .loaders import load_torch

    return load_torch(path, split, transform)


def load_frame(path):
    """A pandas DataFrame with one row per indexed image of a work directory (rejected ones with their reason)."""
    from .loaders import load_frame

    return load_frame(path)
