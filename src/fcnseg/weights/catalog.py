"""Trained weights as typed values: ``get_weights("camvid")`` is a ``Weights`` (architecture, record, file, the
input preprocessing and what was measured), ``list_weights()`` names the built-in ones."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import FcnsegError
from ..record import CheckpointRecord, PairedTransform
from .checkpoint import builtin_checkpoints, load_checkpoint, read_record, resolve_checkpoint


@dataclass(frozen=True)
class Weights:
    """One weight file: ``arch`` (the registered model it fills), its checked ``record``, its ``path``, and ``meta``:
    the measured ``metrics`` with their ``split`` and ``command``, how the checkpoint was chosen (``checkpoint_chosen``;
    ``selection``: the dev split, its lists' SHA-256 and the dev scores, for weights chosen on dev), the training
    recipe and command, the code version, and what the training cost: ``wall_time_s``, ``train_images_per_second``,
    ``threads`` (as the recipe asked) and ``cpu`` (the processor, its PyTorch capability and cores, from
    ``provenance["cpu"]``, which ``fcnseg train`` writes into every checkpoint). Each is None where the record does
    not say (weights trained before the CPU was recorded)."""

    name: str
    arch: str
    record: CheckpointRecord
    path: Path
    meta: dict[str, Any]

    def transforms(self) -> PairedTransform:
        """The evaluation preprocessing of this file's inputs (the record's mean and std, original resolution)."""
        return self.record.transforms()

    def load(self, device: str | torch.device = "cpu") -> nn.Module:
        """The network with these weights, in eval mode, with ``.record`` (``load_checkpoint``)."""
        return load_checkpoint(self.path, device=device)


def list_weights() -> list[str]:
    """Names of the built-in weights (``get_weights(name)``)."""
    return sorted(builtin_checkpoints())


def get_weights(name_or_path: str | Path) -> Weights:
    """A built-in name (``list_weights()``), a ``.safetensors`` checkpoint or a run directory, as ``Weights``; an
    unknown name is a one-line ``FcnsegError`` listing the built-in ones."""
    path = resolve_checkpoint(name_or_path)
    if path.suffix != ".safetensors":
        raise FcnsegError(f"{path}: weights are .safetensors checkpoints; convert other formats with 'fcnseg convert'")
    record = read_record(path)
    name = str(name_or_path) if str(name_or_path) in builtin_checkpoints() else path.stem
    return Weights(name=name, arch=record.arch, record=record, path=path, meta=_meta(record))


def _meta(record: CheckpointRecord) -> dict[str, Any]:
    """What a record says about how its weights were made and measured (None for what it does not say)."""
    metrics = record.metrics
    provenance = record.provenance
    recipe = provenance.get("config")
    released = str(provenance.get("released_from") or "")
    selection = metrics.get("selected_on")  # weights chosen on a shipped dev split (scripts/release_model.py)
    on = selection["split"] if isinstance(selection, dict) and selection.get("split") else "validation"
    chosen = (f"the epoch with the best {on} mean IU (best.safetensors)" if released.endswith("best.safetensors")
              else "the last epoch (last.safetensors)" if released.endswith("last.safetensors") else None)
    return {"metrics": metrics, "split": metrics.get("split"), "metrics_command": metrics.get("command"),
            "checkpoint_chosen": chosen, "selection": selection if isinstance(selection, dict) else None, "recipe": recipe, "command": provenance.get("command"),
            "code": provenance.get("code"), "cpu": provenance.get("cpu"), "wall_time_s": provenance.get("wall_time_s"),
            "train_images_per_second": provenance.get("train_images_per_second"),
            "threads": recipe.get("threads") if isinstance(recipe, dict) else None}
