"""Training runs: configuration in, run directory out (``fit``); the per-epoch work is in ``fcnseg.train.engine``."""
from .run import fit

__all__ = ["fit"]
