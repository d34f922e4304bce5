"""verify-train's plots, drawn from made-up predictions (no training): the prediction grid
shows the most confident mistakes first, marked in text, and the confusion matrix names every
class on both axes up to 100 classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.stages import train


class Images:
    """What _plots reads of the test split: (image, label) pairs, as tf.data gives them."""

    def __init__(self, labels):
        self.labels = labels

    def as_numpy_iterator(self):
        return ((np.full((8, 8, 3), 10 * i % 256, np.uint8), int(y)) for i, y in enumerate(self.labels))


def probabilities(rows: list[tuple[int, float]], classes: int) -> np.ndarray:
    """A row per test image: ``confidence`` on the predicted class, the rest shared out."""
    p = np.zeros((len(rows), classes))
    for i, (predicted, confidence) in enumerate(rows):
        p[i] = (1 - confidence) / (classes - 1)
        p[i, predicted] = confidence
    return p


def metrics(y_true, predicted, classes: int) -> dict:
    matrix = np.zeros((classes, classes), int)
    for t, q in zip(y_true, predicted, strict=True):
        matrix[t, q] += 1
    return {"history": {"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.4, 0.7],
                        "val_accuracy": [0.3, 0.6]},
            "best_epoch": 2, "model": "small", "format": "pkl.gz", "confusion_matrix": matrix.tolist(),
            "test_accuracy": float(np.mean(np.array(y_true) == np.array(predicted))), "test_labels": list(y_true)}


@pytest.fixture
def figures(monkeypatch) -> dict:
    """The figures _plots saves, by file name, instead of their PNGs."""
    saved = {}
    monkeypatch.setattr(train, "_savefig", lambda fig, path: saved.__setitem__(Path(path).name, fig))
    return saved


def test_the_most_confident_mistakes_come_first():
    y_true = np.array([0, 1, 2, 0, 1, 2, 0])
    p = probabilities([(0, 0.9), (2, 0.6), (0, 0.95), (0, 0.5), (1, 0.8), (1, 0.7), (0, 0.99)], 3)
    # wrong: 2 (0.95), 5 (0.7), 1 (0.6); right, a class in turn: 0, 3, 6 of class 0 and 4 of class 1
    assert train._grid_indices(y_true, p, size=6) == [2, 5, 1, 0, 4, 3]
    assert train._grid_indices(y_true, p, size=4) == [2, 5, 1, 0]  # a quarter of the grid left for right ones
    assert train._grid_indices(y_true, p, size=2) == [2, 5]


def test_the_prediction_grid_says_right_and_wrong_in_words(figures: dict, tmp_path: Path):
    classes = ["cat", "dog", "bird"]
    y_true = [0, 1, 2, 0, 1]
    rows = [(0, 0.9), (0, 0.97), (1, 0.55), (0, 0.8), (1, 0.6)]
    train._plots(tmp_path, metrics(y_true, [q for q, _ in rows], 3), Images(y_true), probabilities(rows, 3), classes)
    titles = [ax.get_title() for ax in figures["predictions.png"].axes if ax.get_title()]
    assert titles == [
        "✗ pred: cat\ntrue: dog\nconfidence 0.97",
        "✗ pred: dog\ntrue: bird\nconfidence 0.55",
        "✓ cat\nconfidence 0.90",
        "✓ dog\nconfidence 0.60",
        "✓ cat\nconfidence 0.80",
    ]
    assert "2 of 5 wrong" in figures["predictions.png"].get_suptitle()
    assert set(figures) == {"training_curves.png", "confusion_matrix.png", "predictions.png"}


@pytest.mark.parametrize("n", [4, 30, 100])
def test_the_confusion_matrix_names_every_class_on_both_axes(figures: dict, tmp_path: Path, n: int):
    classes = [f"species_{i:03d}_{'x' * (i % 30)}" for i in range(n)]
    y_true = list(range(n)) * 2
    rows = [((t + k) % n, 0.8) for k, t in enumerate(y_true)]
    train._confusion_matrix(tmp_path, np.array(metrics(y_true, [q for q, _ in rows], n)["confusion_matrix"]),
                            classes, 0.5)
    fig = figures["confusion_matrix.png"]
    ax = fig.axes[0]
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        texts = [label.get_text() for label in labels]
        assert len(texts) == n and len(set(texts)) == n  # each class, told apart
        assert all(c.startswith(t.rstrip("…")) for c, t in zip(classes, texts, strict=True))
    font = ax.get_xticklabels()[0].get_fontsize()
    assert (font, ax.get_xticklabels()[0].get_rotation()) == {4: (10, 45), 30: (8, 90), 100: (5.5, 90)}[n]
    assert 5 <= fig.get_figwidth() <= 16
