"""What a run directory shows people: code version, metrics.jsonl, curves, image grids, confusion matrix."""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..files import atomic_write
from ..evaluation.metrics import json_safe
from ..modes import eval_mode
from ..inference.visualize import colorize


def code_version() -> dict[str, Any]:
    """fcnseg and torch versions, and the git commit / describe of the source tree when it is a checkout."""
    from ..version import __version__

    info: dict[str, Any] = {"fcnseg": __version__, "torch": torch.__version__, "python": platform.python_version()}
    src = Path(__file__).resolve().parent
    for key, cmd in (("git_commit", ["git", "rev-parse", "HEAD"]),
                     ("git_describe", ["git", "describe", "--always", "--dirty", "--tags"])):
        try:
            out = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                info[key] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(json_safe(obj), indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    text = "".join(json.dumps(json_safe(r)) + "\n" for r in rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: Path) -> None:
    plt = _plt()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def plot_curves(history: Sequence[dict], path: str | Path, stage_starts: Sequence[int] = ()) -> None:
    """Training loss, and training / validation accuracy and validation mean IU, per epoch; a dashed
    line before each epoch in ``stage_starts`` (where a later training stage began)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ep = [h["epoch"] for h in history]
    ax1.plot(ep, [h.get("train_loss") for h in history], "o-", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_title("loss")
    ax1.grid(alpha=0.3)
    ax2.plot(ep, [h.get("train_pixel_accuracy") for h in history], "o-", label="train pixel acc.")
    val = [h for h in history if h.get("val")]
    for key, label in (("pixel_accuracy", "val pixel acc."), ("mean_accuracy", "val mean acc."),
                       ("mean_iou", "val mean IU")):
        ax2.plot([h["epoch"] for h in val], [h["val"][key] for h in val], "s-", label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.set_title("accuracy")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower right")
    for start in stage_starts:
        for ax in (ax1, ax2):
            ax.axvline(start - 0.5, color="gray", linestyle="--", linewidth=1)
    _save_fig(fig, Path(path))


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8."""
    x = image.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def prediction_grid(model, dataset, indices: Sequence[int], device: torch.device, colors, mean, std,
                    path: str | Path, ignore_index: int = 255) -> None:
    """One row per image: image, ground truth, prediction."""
    plt = _plt()
    rows = len(indices)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for r, i in enumerate(indices):
        image, mask = dataset[i][:2]
        with eval_mode(model):
            pred = model(image.unsqueeze(0).to(device)).argmax(1)[0].cpu().numpy()
        name = dataset.names[i] if hasattr(dataset, "names") else str(i)
        for c, (img, title) in enumerate(((denormalize(image, mean, std), name),
                                          (colorize(mask.numpy(), colors, ignore_index), "ground truth"),
                                          (colorize(pred, colors, ignore_index), "prediction"))):
            axes[r, c].imshow(img)
            axes[r, c].set_title(title, fontsize=8)
            axes[r, c].axis("off")
    _save_fig(fig, Path(path))


def plot_confusion(matrix, class_names: Sequence[str], path: str | Path, title: str = "confusion matrix") -> None:
    """Row-normalised confusion matrix (each ground-truth row sums to 1)."""
    plt = _plt()
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    k = len(class_names)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if norm[i, j] >= 0.01:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save_fig(fig, Path(path))


class Scalars:
    """TensorBoard event files under ``RUN/tensorboard`` (quietly absent if tensorboard is not installed)."""

    def __init__(self, folder: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder), purge_step=purge_step)
        except ImportError:
            self.writer = None

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and value == value:  # NaN-free
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
