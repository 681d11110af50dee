"""Networks: backbones keyed by stride, the FCN head, upsampling, and the registered models."""
from . import light, multihead, paper, resnet  # noqa: F401  (register the paper's nets and the light backbones)
from .backbones import Backbone
from .convolutionalize import convolutionalize, fc_to_conv
from .fcn import FCN
from .geometry import Geometry
from .paper import transfer_weights
from .upsample import Upsample, bilinear_kernel

__all__ = ["Backbone", "FCN", "Geometry", "Upsample", "bilinear_kernel", "convolutionalize", "fc_to_conv",
           "transfer_weights"]
