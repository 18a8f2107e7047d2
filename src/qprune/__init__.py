"""qprune: pruning experiments on real- and quaternion-valued neural networks."""

from .algebra import Algebra
from .models import MODELS, build_model, count_parameters, dense_real_parameters, parameter_counts
from .quaternion import QConv2d, QLinear, hamilton_block, quaternion_init_
from .quaternion_norm import QBatchNorm2d

__all__ = [
    "MODELS", "Algebra", "QBatchNorm2d", "QConv2d", "QLinear", "build_model", "count_parameters",
    "dense_real_parameters", "hamilton_block", "parameter_counts", "quaternion_init_",
]
__version__ = "0.1.0"
