"""curvi: curvature-aware variational inference for Pyro."""

from .arrowhead import ArrowheadCholesky, ArrowheadPrecision, RepairReport
from .hessian import ArrowheadHessian, dense_hessian, gradient, structured_hessian
from .model import ModelView
from .repair import Clip, Jitter, SoftAbs, SoftplusFloor

__version__ = "0.1.0"

__all__ = [
    "ArrowheadCholesky",
    "ArrowheadHessian",
    "ArrowheadPrecision",
    "Clip",
    "Jitter",
    "ModelView",
    "RepairReport",
    "SoftAbs",
    "SoftplusFloor",
    "dense_hessian",
    "gradient",
    "structured_hessian",
]
