"""prep: a folder of class-sorted images in, a packaged and verified dataset out.

Architecture (data flows one way, top to bottom; no module imports one above it)::

    cli.py          parse options, build a stage config, call the stage, report
    config.py       defaults from prep.toml / [tool.prep], checked against the CLI's options
    stages/         one module per command: sample, index, resize, split, encode, pack, verify,
                    train (verify-train), report and card, status
    loaders.py      the public load API (load, load_tf, load_classes); verify-train uses it too
    imaging.py      the pure per-image transform: bytes in, 8-bit pixels or a reason out
    spec.py         the resize settings (what decides the pixels), without imaging's imports
    executors.py    serial / local processes / Dask behind concurrent.futures.Executor
    sources.py      listing and reading the RAW tree, a folder or an fsspec URL
    manifest.py     manifest.json: settings, counts and checksums of what was packaged
    workdir.py      the work directory's files, atomic writes, CSV/JSON, locks, up-to-date stamps
    formats/        pkl.gz, h5, tfrecord: a writer and readers each, in one registry
    errors.py       the exceptions the CLI prints as one-line messages
"""

__version__ = "0.1.0"


# The load API is imported on first call, so `import pipeline` stays light.
def load(path):
    """((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) from a pkl.gz, h5, tfrecord/ or work directory."""
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
