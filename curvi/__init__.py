"""curvi: curvature-aware variational inference for Pyro."""

from .arrowhead import ArrowheadCholesky, ArrowheadPrecision, PrecisionCholeskyNormal, RepairReport
from .arviz import to_inference_data
from .compositional import CompositionalNG, latent_curvature
from .diagnostics import GradientVariance, compare_gradient_variance, gradient_variance, surrogate_terms
from .distributed import local_units
from .eigen import EigenResult, coordinate_names, eigen
from .factors import FactorView
from .fit import FitOutcome, FitResult, elbo_converged, fit
from .flows import FlowHessian, log_density_hessian
from .glmm import GLMM, glmm
from .glmm_fit import MaximumLikelihoodFit, PosteriorFit
from .guides import AmortizedLaplaceGuide, LaplaceGuide
from .hessian import ArrowheadHessian, dense_hessian, gradient, local_hessian, structured_hessian
from .laplace_newton import (
    FixedNoise,
    LaplaceNewton,
    NewtonStep,
    TrustRegion,
    fit_newton,
    newton_step,
)
from .leave_one_out import LeaveOneOut_ELBO
from .marginal import LaplaceMarginal, LaplaceMode, laplace_log_marginal, laplace_mode
from .mle import LaplaceFit, laplace_mle
from .model import ModelView
from .modes import ModeConvergenceWarning, ModeResult, implicit_modes, solve_modes
from .natural_gradient import NaturalGradient
from .particles import CollapsedELBO, particle_elbos
from .plots import plot_caterpillar, plot_elbo, plot_marginals, plot_spectrum
from .posterior import ArrowheadNormal, LaplaceGaussian, LaplacePosterior, laplace_gaussian
from .psis import PSISResult, psis
from .quadrature import (
    LaplaceBias,
    QuadratureLogMarginal,
    gauss_hermite_rule,
    laplace_bias,
    quadrature_log_marginal,
    unit_disagreement,
)
from .repair import Clip, Jitter, SoftAbs, SoftplusFloor
from .taylor_cv import TaylorCV_ELBO

__version__ = "0.1.0"

__all__ = [
    "AmortizedLaplaceGuide",
    "ArrowheadCholesky",
    "ArrowheadHessian",
    "ArrowheadNormal",
    "ArrowheadPrecision",
    "Clip",
    "CompositionalNG",
    "CollapsedELBO",
    "EigenResult",
    "FactorView",
    "FitOutcome",
    "FitResult",
    "FixedNoise",
    "GLMM",
    "FlowHessian",
    "GradientVariance",
    "Jitter",
    "LaplaceBias",
    "LaplaceFit",
    "LaplaceGaussian",
    "LaplaceGuide",
    "LaplaceMarginal",
    "LaplaceMode",
    "LaplaceNewton",
    "LaplacePosterior",
    "LeaveOneOut_ELBO",
    "MaximumLikelihoodFit",
    "ModeConvergenceWarning",
    "NaturalGradient",
    "ModeResult",
    "ModelView",
    "NewtonStep",
    "PSISResult",
    "PosteriorFit",
    "PrecisionCholeskyNormal",
    "QuadratureLogMarginal",
    "RepairReport",
    "SoftAbs",
    "SoftplusFloor",
    "TrustRegion",
    "TaylorCV_ELBO",
    "compare_gradient_variance",
    "coordinate_names",
    "dense_hessian",
    "eigen",
    "elbo_converged",
    "fit",
    "fit_newton",
    "gauss_hermite_rule",
    "glmm",
    "gradient",
    "gradient_variance",
    "implicit_modes",
    "laplace_bias",
    "laplace_gaussian",
    "laplace_log_marginal",
    "laplace_mle",
    "latent_curvature",
    "local_units",
    "laplace_mode",
    "local_hessian",
    "log_density_hessian",
    "newton_step",
    "particle_elbos",
    "plot_caterpillar",
    "plot_elbo",
    "plot_marginals",
    "plot_spectrum",
    "psis",
    "quadrature_log_marginal",
    "solve_modes",
    "structured_hessian",
    "surrogate_terms",
    "to_inference_data",
    "unit_disagreement",
]
