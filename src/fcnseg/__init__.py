"""fcnseg: Fully Convolutional Networks for semantic segmentation (Long, Shelhamer, Darrell, CVPR 2015)."""
from . import models  # noqa: F401  (fills the registry)
from .evaluation.checkpoint import evaluate_checkpoint
from .inference.options import TTA, Resize, Tiling
from .inference.segmenter import Segmenter
from .registry import build_model, list_models, register_model
from .version import __version__
from .weights.catalog import Weights, get_weights, list_weights
from .weights.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["Resize", "Segmenter", "TTA", "Tiling", "Weights", "build_model", "evaluate_checkpoint", "get_weights",
           "list_models", "list_weights", "load_checkpoint", "register_model", "save_checkpoint", "__version__"]
