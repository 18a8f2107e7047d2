"""qprune: pruning experiments on real- and quaternion-valued neural networks."""

from .algebra import Algebra
from .models import MODELS, build_model, count_parameters, dense_real_parameters
from .quaternion import QConv2d, QLinear, hamilton_block, quaternion_init_

__all__ = [
    "MODELS", "Algebra", "QConv2d", "QLinear", "build_model", "count_parameters", "dense_real_parameters",
    "hamilton_block", "quaternion_init_",
]
__version__ = "0.1.0"
