"""The curvature core: K-FAC layers, losses as distributions, Kronecker factors, exact Fisher, inverses,
and the curvature engine that owns them for every K-FAC front end."""
from .layers import Capture, KFACLayer, find_layers, homogeneous
from .losses import Bernoulli, Categorical, Gaussian, Loss, get_loss
from .factors import (KroneckerFactors, batch_factors, factor_pairs, kron_fisher_dense, output_gradients,
                      params_to_vector, unvec, vec, vector_to_params)
from .exact import FisherMatrix, estimate_exact_fisher_bytes, exact_fisher
from .inverses import (BlockDiagonalInverse, BlockTridiagonalInverse, TridiagonalSide, as_gamma, generalized_eig,
                       make_inverse, pi_factor, tridiagonal_side)
from .engine import CurvatureEngine, subset_rows

__all__ = [
    "Capture", "KFACLayer", "find_layers", "homogeneous",
    "Bernoulli", "Categorical", "Gaussian", "Loss", "get_loss",
    "KroneckerFactors", "batch_factors", "factor_pairs", "kron_fisher_dense", "output_gradients",
    "params_to_vector", "unvec", "vec", "vector_to_params",
    "FisherMatrix", "estimate_exact_fisher_bytes", "exact_fisher",
    "BlockDiagonalInverse", "BlockTridiagonalInverse", "TridiagonalSide", "as_gamma", "generalized_eig",
    "make_inverse", "pi_factor", "tridiagonal_side", "CurvatureEngine", "subset_rows",
]
