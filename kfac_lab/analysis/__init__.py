"""Studies of K-FAC's approximations, each returning an ``xarray.Dataset`` (named dims, coords
naming every parameter, provenance attrs of str/int/float only — zarr and netCDF ready):

- :func:`approximation_study` — F vs K-FAC / KFC-expand, KFC-reduce and EKFAC side by side, with
  their relative errors (:func:`approximation_errors`);
- :func:`kfc_assumptions` — where KFC's three assumptions hold on a CNN's convolutions;
- :func:`fisher_study` — F vs F̃ (figure 1), F̃⁻¹ and block averages (figure 2), block-diagonal
  and block-tridiagonal inverses and their errors (figures 5–6);
- :func:`cumulant_study` / :func:`cumulant_terms` — the Kronecker error in cumulants (eqns 3–4);
- :func:`damping_study` — Tikhonov alone vs re-scaling vs momentum (figure 7);
- :func:`invariance_study` — tanh vs logistic twin and affine inputs, K-FAC vs SGD (Corollary 2);
- :func:`figure1_setup` — the partially trained 256-20-20-20-20-10 network of figure 1;
- :func:`iteration_flops` — the GEMM flops of each phase of a K-FAC iteration against an SGD step.
"""
from .approximations import approximation_errors, approximation_study
from .cost import iteration_flops
from .cumulants import PAPER_TOTAL_BOUND, PAPER_TOTAL_ERROR, cumulant_study, cumulant_terms
from .damping import damping_study
from .fisher import FIGURE1_HIDDEN_LAYERS, FIGURE1_LAYERS, figure1_setup, fisher_study
from .kfc import kfc_assumptions
from .invariance import invariance_study, twin_networks

__all__ = [
    "fisher_study", "figure1_setup", "FIGURE1_LAYERS", "FIGURE1_HIDDEN_LAYERS",
    "cumulant_study", "cumulant_terms", "PAPER_TOTAL_ERROR", "PAPER_TOTAL_BOUND",
    "damping_study", "invariance_study", "twin_networks", "iteration_flops",
    "approximation_study", "approximation_errors", "kfc_assumptions",
]
