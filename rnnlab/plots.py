"""Figures of a run as PNG files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def plot_training_curves(records: Sequence[dict[str, Any]], path: str) -> None:
    """Loss and accuracy against the step, one line per split, from `metrics.jsonl`
    records (`{"step", "split", "loss", "accuracy", ...}`); writes a PNG to `path`.

    Panels: "loss" (log scale) and, when any record has it, "accuracy".
    """
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for name in ("loss", "accuracy"):
            if isinstance(record.get(name), (int, float)):
                series[name][record["split"]].append((record["step"], record[name]))
    names = [name for name in ("loss", "accuracy") if series[name]]
    figure, axes = plt.subplots(1, max(len(names), 1), figsize=(5 * max(len(names), 1), 3.6), squeeze=False)
    for axis, name in zip(axes[0], names):
        for split, points in sorted(series[name].items()):
            steps, values = zip(*points)
            axis.plot(steps, values, marker="o" if split != "train" else None, markersize=3, label=split)
        axis.set_xlabel("step")
        axis.set_title(name)
        if name == "loss":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_reading(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, path: str) -> None:
    """The "model reading a digit" figure; writes a PNG to `path`.

    For every digit: its image, then one small bar chart of the 10 class probabilities
    after each row read (two rows of 14 panels). The true class's bar is green, any
    other predicted (arg-max) class's bar orange.

    Args:
      images: `[n, 28, 28]` digit images.
      labels: `[n]` true classes.
      probabilities: `[n, T, 10]`, the prediction after rows `0..t` at `[i, t]`.
    """
    n, num_steps, num_classes = probabilities.shape
    per_line = (num_steps + 1) // 2
    figure = plt.figure(figsize=(1.0 * (per_line + 2), 2.3 * n))
    grid = figure.add_gridspec(2 * n, per_line + 2, wspace=0.15, hspace=0.6)
    classes = np.arange(num_classes)
    for i in range(n):
        image_axis = figure.add_subplot(grid[2 * i : 2 * i + 2, 0:2])
        image_axis.imshow(images[i], cmap="gray_r")
        image_axis.set_title(f"label {int(labels[i])}", fontsize=9)
        image_axis.axis("off")
        for t in range(num_steps):
            axis = figure.add_subplot(grid[2 * i + t // per_line, 2 + t % per_line])
            colors = ["tab:blue"] * num_classes
            predicted = int(np.argmax(probabilities[i, t]))
            colors[predicted] = "tab:orange"
            colors[int(labels[i])] = "tab:green"
            axis.bar(classes, probabilities[i, t], color=colors, width=0.8)
            axis.set_ylim(0, 1)
            axis.set_yticks([])
            if t // per_line == 1:  # class labels under the lower line of panels
                axis.set_xticks(classes, [str(c) for c in classes], fontsize=4)
                axis.tick_params(axis="x", length=0, pad=1)
            else:
                axis.set_xticks([])
            axis.set_title(f"row {t + 1}", fontsize=6, pad=2)
    figure.suptitle("class probabilities after each row read (green: true class, orange: other arg-max)", fontsize=10)
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)
