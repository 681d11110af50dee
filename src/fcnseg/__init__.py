"""fcnseg: Fully Convolutional Networks for semantic segmentation (Long, Shelhamer, Darrell, CVPR 2015)."""
from . import models  # noqa: F401  (fills the registry)
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate_api import evaluate_checkpoint
from .inference import Segmenter
from .registry import build_model, list_models, register_model

__version__ = "0.1.0"

__all__ = ["Segmenter", "build_model", "evaluate_checkpoint", "list_models", "load_checkpoint", "register_model",
           "save_checkpoint", "__version__"]
