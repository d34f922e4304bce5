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

import io
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import workdir
from ..errors import PrepError, VerificationFailed

log = logging.getLogger(__name__)

MODELS = ("cnn", "small", "mlp")
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
    progress: bool = True


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


def run(cfg: TrainConfig) -> TrainResult:
    if cfg.model not in MODELS:
        raise PrepError(f"--model must be one of {', '.join(MODELS)}; received {cfg.model!r}")
    if not 0 <= cfg.margin < 1:
        raise PrepError(f"--margin must be in [0, 1); received {cfg.margin}")
    fmt, path = packaged_path(cfg.workdir, cfg.format)
    out = cfg.workdir.path(workdir.VERIFY_DIR)
    # training is deterministic (seeded, deterministic ops): the same data and settings give the
    # same verdict, so a rerun reports the last one instead of training for minutes again
    from .. import loaders

    classes = loaders.load_classes(path)
    stamp, settings, inputs = workdir.Stamp(cfg.workdir, STAMP), _settings(cfg, fmt, classes), packaged_files(path)
    if (out / "metrics.json").exists() and stamp.is_current(inputs, settings):
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
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True)
    history = model.fit(
        train_ds, validation_data=dataset("valid", shuffle=False), epochs=cfg.epochs, callbacks=[stop],
        shuffle=False,  # the dataset shuffles itself, seeded; Keras cannot shuffle a tf.data.Dataset
        verbose=2 if cfg.progress else 0,
    )
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
    _plots(out, {**metrics, "test_labels": y_test.tolist()}, loaders.load_tf(path, "test"), predicted, classes)
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


def _grid_indices(y_true, predicted, classes: int, size: int = 25) -> list[int]:
    """Test samples to show: every class in turn, mistakes first within a class, sorted."""
    import numpy as np

    per_class = []
    for c in range(classes):
        members = np.flatnonzero(y_true == c)
        wrong = [int(i) for i in members if predicted[i] != c]
        right = [int(i) for i in members if predicted[i] == c]
        per_class.append(wrong + right)
    chosen: list[int] = []
    for depth in range(max((len(m) for m in per_class), default=0)):
        for members in per_class:
            if depth < len(members) and len(chosen) < size:
                chosen.append(members[depth])
    return sorted(chosen)


def _save_model(model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    tmp.replace(path)


def _savefig(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    workdir.atomic_write_bytes(path, buffer.getvalue())


def _plots(out: Path, metrics: dict, test_ds, predicted, classes: list[str]) -> None:
    """training_curves.png, confusion_matrix.png and predictions.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    history = metrics["history"]
    epochs = range(1, len(history["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        ax.plot(epochs, history[key], marker="o", label="train")
        ax.plot(epochs, history[f"val_{key}"], marker="o", label="valid")
        ax.axvline(metrics["best_epoch"], color="grey", linestyle=":", label="best (restored)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"verify-train: {metrics['model']} on {metrics['format']}")
    _savefig(fig, out / "training_curves.png")
    plt.close(fig)

    size = max(4, min(14, 0.6 * len(classes) + 3))
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.array(metrics["confusion_matrix"]), display_labels=classes).plot(
        ax=ax, colorbar=False, xticks_rotation=45 if len(classes) > 6 else "horizontal"
    )
    ax.set_title(f"Test confusion matrix (accuracy {metrics['test_accuracy']:.3f})")
    _savefig(fig, out / "confusion_matrix.png")
    plt.close(fig)

    y_true = np.array(metrics["test_labels"])
    chosen = _grid_indices(y_true, np.asarray(predicted), len(classes))
    cols = min(5, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    wanted = {index: slot for slot, index in enumerate(chosen)}
    for i, (image, label) in enumerate(test_ds.as_numpy_iterator()):
        if i not in wanted:
            continue
        ax = axes.flat[wanted[i]]
        image = image[:, :, 0] if image.shape[-1] == 1 else image
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        right = predicted[i] == label
        ax.set_title(f"{classes[predicted[i]]} / {classes[label]}", fontsize=9, color="green" if right else "red")
        if i >= chosen[-1]:
            break
    fig.suptitle("Test predictions: predicted / true")
    _savefig(fig, out / "predictions.png")
    plt.close(fig)
