"""`prep verify-train`: train a Keras CNN on the packaged files and give a verdict.

If labels were misaligned, channels lost or splits leaky, a model trained on the packaged
data shows it. The data comes through the public loaders (TFRecord streams through
``tf.data``); pixels are scaled to [0, 1]; the model trains on ``train``, early-stops on
``valid`` and is scored on ``test``.

The verdict: the model *learned* when its test accuracy clears the majority-class baseline
by ``margin`` of the headroom, ``acc >= base + margin * (1 - base)``, and a one-sided binomial
test says that accuracy is not luck (p < 0.01). Both matter: the first on large test sets,
the second on small ones.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import manifest, workdir
from ..errors import PrepError, VerificationFailed
from .facts import short

log = logging.getLogger(__name__)

MODELS = ("cnn", "small", "mlp")
CLASS_WEIGHTS = ("none", "balanced")
STAMP = "verify-train"  # the stamp of the last training, under WORKDIR/.stamps
P_VALUE = 0.01


@dataclass
class TrainConfig:
    workdir: workdir.Workdir
    format: str | None = None
    model: str = "cnn"
    epochs: int = 30
    batch_size: int = 64
    patience: int = 4
    seed: int = 42
    margin: float = 0.2
    progress: bool = True  # one bar over every epoch's steps; the epochs are logged at INFO (-v)
    class_weight: str = "none"  # balanced: weigh each class by manifest.class_weights of train
    save_model: bool = False  # keep the trained model as verify/model.keras


@dataclass
class TrainResult:
    format: str
    metrics: dict = field(default_factory=dict)
    out: Path | None = None
    up_to_date: bool = False  # the same packaged data and settings as the last run: not trained again

    @property
    def summary(self) -> str:
        m = self.metrics
        return "Up to date: " * self.up_to_date + (
            f"verify-train ({self.format}, model {m['model']}, {m['epochs_run']} epochs, {m['seconds']:.0f} s):"
            f" test accuracy {m['test_accuracy']:.3f} vs majority baseline {m['baseline_accuracy']:.3f}"
            f" (needed {m['required_accuracy']:.3f}, p={m['p_value']:.1e}) -> {m['verdict']}"
        )


def packaged_path(wd: workdir.Workdir, fmt: str | None) -> tuple[str, Path]:
    """The packaged file of ``fmt``, or of the first format found (pkl.gz, h5, tfrecord)."""
    from ..formats import FORMATS

    if fmt is not None:
        if fmt not in FORMATS:
            raise PrepError(f"--format must be one of {', '.join(FORMATS)}; received {fmt!r}")
        path = wd.path(FORMATS[fmt].OUTPUT)
        if not path.exists():
            raise PrepError(f"{path} does not exist; run `prep pack --format {fmt}` first")
        return fmt, path
    for name, module in FORMATS.items():
        if wd.path(module.OUTPUT).exists():
            return name, wd.path(module.OUTPUT)
    raise PrepError(f"nothing packaged in {wd.root}; run `prep pack` first")


def build_model(name: str, input_shape: tuple[int, int, int], classes: int):
    """The original workflow's CNN (``cnn``), a smaller CNN, or a one-layer MLP."""
    import keras
    from keras import layers

    if name == "cnn":
        body = [
            layers.Conv2D(50, 3, padding="same", activation="relu"),
            layers.Conv2D(75, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Dropout(0.25),
            layers.Conv2D(125, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(500, activation="relu"),
            layers.Dropout(0.4),
            layers.Dense(250, activation="relu"),
            layers.Dropout(0.3),
        ]
    elif name == "small":
        body = [
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(100, activation="relu"),
            layers.Dropout(0.4),
        ]
    elif name == "mlp":
        body = [layers.Flatten(), layers.Dense(512, activation="relu")]
    else:
        raise PrepError(f"--model must be one of {', '.join(MODELS)}; received {name!r}")
    if name != "mlp" and min(input_shape[:2]) < 4:
        raise PrepError(f"images of {input_shape[1]}x{input_shape[0]} are too small for --model {name}; use --model mlp")
    model = keras.Sequential([keras.Input(shape=input_shape), *body, layers.Dense(classes, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def verdict(accuracy: float, baseline: float, n_test: int, margin: float) -> tuple[bool, float, float]:
    """(learned, required accuracy, p-value of the accuracy under the baseline)."""
    from scipy.stats import binomtest

    required = baseline + margin * (1.0 - baseline)
    hits = round(accuracy * n_test)
    p_value = binomtest(hits, n_test, min(max(baseline, 1e-9), 1 - 1e-9), alternative="greater").pvalue
    return accuracy >= required - 1e-12 and p_value < P_VALUE, required, float(p_value)


def _require_keras() -> None:
    """One line with the install command, before any work, when TensorFlow or Keras is missing."""
    from ..formats.tfrecord import INSTALL_TF, import_tf

    import_tf()
    try:
        import keras  # noqa: F401
    except ImportError:
        raise PrepError(INSTALL_TF) from None


OUTPUTS = ("model.keras", "metrics.json", "training_curves.png", "confusion_matrix.png", "predictions.png")


OWNED = ".prep-verify-train"  # written into verify/ before any output: the folder is prep's


def _check_owned(out: Path) -> None:
    """verify/ may be a project's own folder (--workdir .): prep writes its files there only
    while none of their names is taken, or they are its own (its marker, or its metrics.json,
    is there)."""
    if (out / OWNED).is_file():
        return
    taken = [name for name in OUTPUTS if os.path.lexists(out / name)]
    try:
        metrics = workdir.read_json(out / "metrics.json") if taken else None
    except (OSError, PrepError):
        metrics = None
    if taken and not (isinstance(metrics, dict) and {"verdict", "baseline_accuracy"} <= metrics.keys()):
        raise PrepError(f"{out / taken[0]} was not written by prep verify-train: move it away, or use another --workdir")


def run(cfg: TrainConfig) -> TrainResult:
    if cfg.model not in MODELS:
        raise PrepError(f"--model must be one of {', '.join(MODELS)}; received {cfg.model!r}")
    if not 0 <= cfg.margin < 1:
        raise PrepError(f"--margin must be in [0, 1); received {cfg.margin}")
    if cfg.class_weight not in CLASS_WEIGHTS:
        raise PrepError(f"--class-weight must be one of {', '.join(CLASS_WEIGHTS)}; received {cfg.class_weight!r}")
    fmt, path = packaged_path(cfg.workdir, cfg.format)
    _require_keras()
    out = cfg.workdir.path(workdir.VERIFY_DIR)
    _check_owned(out)
    # training is deterministic (seeded, deterministic ops): the same data and settings give the
    # same verdict, so a rerun reports the last one instead of training for minutes again
    from .. import loaders

    classes = loaders.load_classes(path)
    stamp, settings, inputs = workdir.Stamp(cfg.workdir, STAMP), _settings(cfg, fmt, classes), packaged_files(path)
    saved = not cfg.save_model or (out / "model.keras").exists()
    if saved and (out / "metrics.json").exists() and stamp.is_current(inputs, settings):
        return _verdict(TrainResult(fmt, workdir.read_json(out / "metrics.json"), out, up_to_date=True))
    started = time.perf_counter()
    if len(classes) < 2:
        raise PrepError(f"{path} has {len(classes)} class; verify-train needs at least two")
    counts = _class_counts(loaders, path, classes)
    for split, per_class in counts.items():
        if sum(per_class.values()) == 0:
            raise PrepError(f"the {split} split in {path} is empty; pack with ratios that give every split images")
    if len(counts["train"]) < 2:
        raise PrepError(f"the train split in {path} has only one class ({classes[next(iter(counts['train']))]})")
    sizes = {split: sum(per_class.values()) for split, per_class in counts.items()}

    from ..formats.tfrecord import import_tf

    tf = import_tf()
    import keras
    import numpy as np

    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()

    def dataset(split: str, shuffle: bool):
        # the known size lets Keras show progress and stops it warning that data "ran out"
        ds = loaders.load_tf(path, split).apply(tf.data.experimental.assert_cardinality(sizes[split]))
        if shuffle:
            ds = ds.shuffle(min(sizes[split], 10_000), seed=cfg.seed, reshuffle_each_iteration=True)
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)

    train_ds = dataset("train", shuffle=True)
    input_shape = tuple(int(d) for d in train_ds.element_spec[0].shape[1:])
    model = build_model(cfg.model, input_shape, len(classes))
    out.mkdir(parents=True, exist_ok=True)
    workdir.atomic_write_bytes(out / OWNED, b"verify-train's outputs; prep may replace them\n")
    (out / "model.keras").unlink(missing_ok=True)  # an earlier model: not this verdict's
    weights = None
    if cfg.class_weight == "balanced":
        weights = manifest.class_weights({classes[i]: n for i, n in counts["train"].items()})
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True)
    steps = math.ceil(sizes["train"] / cfg.batch_size)
    with _progress(cfg, steps) as progress:
        history = model.fit(
            train_ds, validation_data=dataset("valid", shuffle=False), epochs=cfg.epochs, callbacks=[stop, progress],
            shuffle=False,  # the dataset shuffles itself, seeded; Keras cannot shuffle a tf.data.Dataset
            class_weight=None if weights is None else {i: weights.get(c, 1.0) for i, c in enumerate(classes)},
            verbose=0,  # Keras would print on stdout, which carries --json
        )
    if cfg.save_model:
        _save_model(model, out / "model.keras")

    # one pass over test: the labels come with the predictions
    batches = [(model(x, training=False).numpy(), y.numpy()) for x, y in dataset("test", shuffle=False)]
    probabilities = np.concatenate([p for p, _ in batches])
    y_test = np.concatenate([y for _, y in batches]).astype(np.int64)
    predicted = probabilities.argmax(axis=1)
    test_acc = float(np.mean(predicted == y_test))
    test_loss = float(np.mean(-np.log(np.clip(probabilities[np.arange(len(y_test)), y_test], 1e-7, 1.0))))
    majority = counts["train"].most_common(1)[0][0]
    baseline = float(np.mean(y_test == majority))
    learned, required, p_value = verdict(test_acc, baseline, len(y_test), cfg.margin)

    from sklearn.metrics import classification_report, confusion_matrix

    ids = list(range(len(classes)))
    report = classification_report(y_test, predicted, labels=ids, target_names=classes, output_dict=True, zero_division=0)
    matrix = confusion_matrix(y_test, predicted, labels=ids)
    metrics = {
        "format": fmt,
        "model": cfg.model,
        "seed": cfg.seed,
        "epochs_run": len(history.history["loss"]),
        "epochs_max": cfg.epochs,
        "best_epoch": int(np.argmin(history.history["val_loss"])) + 1,
        "test_loss": float(test_loss),
        "test_accuracy": float(test_acc),
        "baseline_accuracy": baseline,
        "baseline_class": classes[majority],
        "margin": cfg.margin,
        "class_weights": weights,
        "required_accuracy": required,
        "p_value": p_value,
        "verdict": "learned" if learned else "did not learn",
        "counts": sizes,
        "classes": classes,
        "per_class": {c: report[c] for c in classes},
        "confusion_matrix": matrix.tolist(),
        "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
        "seconds": time.perf_counter() - started,
    }
    workdir.write_json(out / "metrics.json", metrics)
    _plots(out, {**metrics, "test_labels": y_test.tolist()}, loaders.load_tf(path, "test"), probabilities, classes)
    stamp.record(inputs, settings, sorted(p for p in out.iterdir() if p.is_file()))
    return _verdict(TrainResult(fmt, metrics, out))


def packaged_files(path: Path) -> list[Path]:
    """The files of a packaged format: the file itself, or those of its folder (tfrecord)."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _settings(cfg: TrainConfig, fmt: str, classes: list[str]) -> dict:
    """What the verdict depends on besides the packaged bytes: the options, the class names (kept
    beside a pkl.gz, not in it), and the code that trains (prep's version, Keras, TensorFlow)."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:  # e.g. tensorflow-cpu: the import says what is missing
            return None

    options = {k: getattr(cfg, k) for k in ("model", "epochs", "batch_size", "patience", "seed", "margin")}
    if cfg.class_weight != "none":  # absent otherwise, so the verdicts of runs before the option still stand
        options["class_weight"] = cfg.class_weight
    return {**options, "format": fmt, "classes": classes, "prep": __version__, "keras": installed("keras"),
            "tensorflow": installed("tensorflow")}


def _verdict(result: TrainResult) -> TrainResult:
    """``result``, or VerificationFailed with advice if the model did not learn."""
    if result.metrics["verdict"] != "learned":
        raise VerificationFailed(result.summary + ". " + _advice(result.metrics))
    return result


def _class_counts(loaders, path: Path, classes: list[str]) -> dict[str, Counter]:
    """split -> Counter of label ids: from the manifest beside the data, else by reading the labels."""
    from ..formats import SPLITS

    manifest = path.parent / workdir.MANIFEST
    if manifest.is_file():
        splits = workdir.read_json(manifest).get("splits", {})
        if all(s in splits for s in SPLITS):
            ids = {name: i for i, name in enumerate(classes)}
            return {s: Counter({ids[c]: n for c, n in splits[s]["classes"].items() if n}) for s in SPLITS}
    return {
        s: Counter(int(y) for _, y in loaders.load_tf(path, s).as_numpy_iterator()) for s in SPLITS
    }


def _advice(metrics: dict) -> str:
    counts = metrics["counts"]
    per_class = counts["train"] / max(1, len(metrics["classes"]))
    hints = ["that labels line up with images (labels.csv, encoded.csv)"]
    if per_class < 20:
        hints.append(f"only {per_class:.0f} training images per class on average: add images")
    hints.append("whether the classes can be told apart at this size (try a larger --size)")
    return "Check: " + "; ".join(hints) + f"; see {workdir.VERIFY_DIR}/metrics.json"


@contextlib.contextmanager
def _progress(cfg: TrainConfig, steps: int):
    """A Keras callback drawing one bar over every step of every epoch (with the time left) and
    logging each epoch's losses and accuracies at INFO; log lines are written above the bar."""
    import keras

    from ..executors import progress

    class Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            bar.update(1)

        def on_epoch_end(self, epoch, logs=None):
            shown = ", ".join(f"{k} {v:.4f}" for k, v in (logs or {}).items() if isinstance(v, (int, float)))
            log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, shown)

    with progress(cfg.epochs * steps, "train", cfg.progress, unit="step") as bar:
        if cfg.progress and hasattr(bar, "clear"):  # a tqdm bar
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():
                yield Progress()
        else:
            yield Progress()


def _save_model(model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    tmp.replace(path)


GRID, GRID_COLUMNS = 15, 3  # test images in predictions.png, and images a row (few: legible on a phone)
PLOT_DPI = 150  # the PNGs' dots per inch: the report shows them at 100 CSS px an inch, sharp on dense screens


def _grid_indices(y_true, probabilities, size: int = GRID) -> list[int]:
    """Test samples to show, in order: the most confident mistakes first (at most 3/4 of the
    grid while right ones are there), then right ones, one of each class in turn."""
    import numpy as np

    predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    right = [list(np.flatnonzero((predicted == y_true) & (y_true == c))) for c in range(probabilities.shape[1])]
    n_right = sum(map(len, right))
    chosen = [int(i) for i in wrong[: size - min(size // 4, n_right)]]
    for depth in range(max(map(len, right), default=0)):
        for members in right:
            if depth < len(members) and len(chosen) < size:
                chosen.append(int(members[depth]))
    return chosen


def _savefig(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PLOT_DPI, metadata={"Software": None})
    workdir.atomic_write_bytes(path, buffer.getvalue())


def _plots(out: Path, metrics: dict, test_ds, probabilities, classes: list[str]) -> None:
    """training_curves.png, confusion_matrix.png and predictions.png, each about 5-6 inches
    wide (the confusion matrix grows with the classes) so that they read on a phone too."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    import numpy as np

    history = metrics["history"]
    epochs = range(1, len(history["loss"]) + 1)
    fig = Figure(figsize=(5.0, 5.6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        ax.plot(epochs, history[key], marker="o", label="train")
        ax.plot(epochs, history[f"val_{key}"], marker="o", label="valid")
        ax.axvline(metrics["best_epoch"], color="grey", linestyle=":", label="best (restored)")
        ax.set_ylabel(key)
        ax.set_title(title, fontsize=11)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=9)
    axes[1].set_xlabel("epoch")
    fig.suptitle(f"verify-train: {metrics['model']} on {metrics['format']}", fontsize=12)
    _savefig(fig, out / "training_curves.png")

    _confusion_matrix(out, np.array(metrics["confusion_matrix"]), classes, metrics["test_accuracy"])

    y_true = np.array(metrics["test_labels"])
    probabilities = np.asarray(probabilities)
    predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    chosen = _grid_indices(y_true, probabilities)
    cols = min(GRID_COLUMNS, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(1.8 * cols, 2.5 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    slots = {index: slot for slot, index in enumerate(chosen)}
    last = max(chosen, default=-1)
    for i, (image, label) in enumerate(test_ds.as_numpy_iterator()):
        if i in slots:
            ax = axes.flat[slots[i]]
            image = image[:, :, 0] if image.shape[-1] == 1 else image
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            p, name = int(predicted[i]), short(classes[predicted[i]], 14)
            if p == label:  # the mark says it; the colour only repeats it
                ax.set_title(f"✓ {name}\nconfidence {confidence[i]:.2f}", fontsize=10, color="#1a7f37")
            else:
                ax.set_title(f"✗ pred: {name}\ntrue: {short(classes[label], 14)}\nconfidence {confidence[i]:.2f}",
                             fontsize=10, color="#cf222e")
        if i >= last:
            break
    wrong = int(np.sum(predicted != y_true))
    fig.suptitle(f"Test predictions: {wrong} of {len(y_true)} wrong"
                 + ("\nthe most confident mistakes first" if wrong else ""), fontsize=11)
    _savefig(fig, out / "predictions.png")


def _confusion_matrix(out: Path, matrix, classes: list[str], accuracy: float) -> None:
    """Counts of true (rows) x predicted (columns) classes, shaded by the share of the true
    class; every class named on both axes up to 100 classes (smaller, turned labels as they
    grow), counts written in the cells up to 30."""
    from matplotlib.figure import Figure
    import numpy as np

    n = len(classes)
    font = 10 if n <= 10 else 9 if n <= 20 else 8 if n <= 40 else 6.5 if n <= 70 else 5.5
    names = [short(c, 24 if n <= 20 else 16) for c in classes]
    size = min(16.0, max(5.0, 2.0 + 0.14 * n + font * 0.6 * max(map(len, names)) / 72))  # cells + labels
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ticks = np.arange(n)
    turned = 90 if n > 12 else 45 if max(map(len, names)) > 4 else 0
    ax.set_xticks(ticks, names, fontsize=font, rotation=turned, ha="right" if turned == 45 else "center",
                  rotation_mode="anchor" if turned == 45 else "default")
    ax.set_yticks(ticks, names, fontsize=font)
    if n <= 30:
        for (t, p), count in np.ndenumerate(matrix):
            if count or n <= 10:  # among many classes the zeros would hide the counts
                ax.text(p, t, str(count), ha="center", va="center", fontsize=font if n <= 15 else font - 1.5,
                        color="white" if shares[t, p] > 0.5 else "#1f2328")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Test confusion matrix (accuracy {accuracy:.3f})", fontsize=11)
    _savefig(fig, out / "confusion_matrix.png")
