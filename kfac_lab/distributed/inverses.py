"""The damped inverses of the approximate Fisher as independent pieces — per-factor Cholesky
inverses, eigendecompositions, or each layer's block-tridiagonal side — for
:func:`~kfac_lab.distributed.assignment.run_shared`, and their assembly into the library's inverse
classes (M&G 2015 §4.2, §4.3, §6.3, Appendix B; docs/architecture.md#distributed-k-fac)."""
from __future__ import annotations

import functools

import torch

from ..curvature import decompositions as dec
from ..curvature.inverses import (BlockDiagonalInverse, BlockTridiagonalInverse, _as_gamma, _generalized_eig,
                                  add_to_diagonal, clamp_conditional, pi_factor)
from .assignment import Task, tridiag_side_cost

__all__ = ["inverse_tasks"]


def inverse_tasks(inputs: dict, gammas: list, damping: str, dtype, names: list[str]):
    """The independent pieces of the inverses of ``inputs`` (``A``, ``G`` and, for the
    block-tridiagonal inverse, ``A_off``, ``G_off``) for every γ in ``gammas``, with their flop
    counts, and a function assembling the inverses (one per γ) from the pieces' results."""
    A = [a.to(dtype) for a in inputs["A"]]
    G = [g.to(dtype) for g in inputs["G"]]
    L = len(A)
    gam = [_as_gamma(g, A[0]) for g in gammas]
    pi = [pi_factor(a, g) for a, g in zip(A, G)]
    tasks: list[Task] = []
    if inputs["A_off"] is None and damping == "tikhonov":
        for i in range(L):
            for side, M in (("A", A[i]), ("G", G[i])):
                d = M.shape[0]
                tasks.append(Task(("eig", side, i), 4.0 * d**3, [(d,), (d, d)], [False, False],
                                  functools.partial(lambda M, w: list(dec.eigh(M, w)), M, f"{side} of {names[i]}")))

        def assemble(results):
            eig = [(tuple(results[("eig", "A", i)]), tuple(results[("eig", "G", i)])) for i in range(L)]
            return [_AssembledBlockDiagonal(A=A, G=G, gamma=g, damping=damping, method="eigh", dtype=dtype, names=names,
                                            pi=pi, A_inv=[], G_inv=[], eig=eig) for g in gam]
        return tasks, assemble

    if inputs["A_off"] is None:
        def damped_inverse(M, shift, what):
            return [dec.cholesky_inverse(add_to_diagonal(M, shift), what)]

        for c, g in enumerate(gam):
            for i in range(L):
                a, gg = A[i], G[i]
                tasks.append(Task(("inv", c, "A", i), float(a.shape[0]) ** 3, [tuple(a.shape)], [True],
                                  functools.partial(damped_inverse, a, pi[i] * g, f"damped A of {names[i]}")))
                tasks.append(Task(("inv", c, "G", i), float(gg.shape[0]) ** 3, [tuple(gg.shape)], [True],
                                  functools.partial(damped_inverse, gg, g / pi[i], f"damped G of {names[i]}")))

        def assemble(results):
            return [_AssembledBlockDiagonal(
                A=A, G=G, gamma=g, damping=damping, method="cholesky", dtype=dtype, names=names, pi=pi,
                A_inv=[results[("inv", c, "A", i)][0] for i in range(L)],
                G_inv=[results[("inv", c, "G", i)][0] for i in range(L)], eig=None) for c, g in enumerate(gam)]
        return tasks, assemble

    if damping != "factored":
        raise ValueError("the block-tridiagonal inverse needs factored Tikhonov damping (damping='factored')")
    A_off = [t.to(dtype) for t in inputs["A_off"]]
    G_off = [t.to(dtype) for t in inputs["G_off"]]

    def side(F, F_off, i, shift_i, shift_next, label):
        # as BlockTridiagonalInverse._build: Ψ_i = F_{i,i+1} Fd_{i+1}⁻¹, C = Ψ_i F_{i+1,i}, Appendix B on (C, Fd_i)
        L_next = dec.cholesky(add_to_diagonal(F[i + 1], shift_next), f"damped {label} of {names[i + 1]}")
        psi = torch.cholesky_solve(F_off[i].t(), L_next).t()
        C = psi @ F_off[i].t()
        L_i = dec.cholesky(add_to_diagonal(F[i], shift_i), f"damped {label} of {names[i]}")
        K, s = _generalized_eig(C, L_i, f"Σ {label}-side of {names[i]}")
        return [psi, K, s]

    def last(M, shift, what):
        return [dec.cholesky_inverse(add_to_diagonal(M, shift), what)]

    for c, g in enumerate(gam):
        for i in range(L - 1):
            for label, F, F_off, sh_i, sh_n in (("A", A, A_off, pi[i] * g, pi[i + 1] * g),
                                                ("G", G, G_off, g / pi[i], g / pi[i + 1])):
                d, dn = F[i].shape[0], F[i + 1].shape[0]
                tasks.append(Task(("tri", c, label, i), tridiag_side_cost(d, dn), [(d, dn), (d, d), (d,)],
                                  [False, False, False], functools.partial(side, F, F_off, i, sh_i, sh_n, label)))
        for label, M, shift in (("A", A[-1], pi[-1] * g), ("G", G[-1], g / pi[-1])):
            d = M.shape[0]
            tasks.append(Task(("last", c, label), float(d) ** 3, [(d, d)], [True],
                              functools.partial(last, M, shift, f"damped {label} of {names[-1]}")))

    def assemble(results):
        out = []
        for c, g in enumerate(gam):
            r = lambda label, i: results[("tri", c, label, i)]
            out.append(_AssembledTridiagonal(
                A=A, G=G, A_off=A_off, G_off=G_off, gamma=g, dtype=dtype, names=names, pi=pi,
                psi_A=[r("A", i)[0] for i in range(L - 1)], psi_G=[r("G", i)[0] for i in range(L - 1)],
                K_A=[r("A", i)[1] for i in range(L - 1)], s_A=[r("A", i)[2] for i in range(L - 1)],
                K_G=[r("G", i)[1] for i in range(L - 1)], s_G=[r("G", i)[2] for i in range(L - 1)],
                last_A_inv=results[("last", c, "A")][0], last_G_inv=results[("last", c, "G")][0]))
        return out
    return tasks, assemble


class _AssembledBlockDiagonal(BlockDiagonalInverse):
    """A ``BlockDiagonalInverse`` whose damped factor inverses (or eigendecompositions) were
    computed across ranks and broadcast; ``apply``/``dense``/``with_gamma`` are the library's."""

    def __init__(self, *, A, G, gamma, damping, method, dtype, names, pi, A_inv, G_inv, eig):  # noqa: D107
        # deliberately not BlockDiagonalInverse.__init__: the pieces are already computed
        self.damping, self.method, self.dtype = damping, method, dtype
        self.A, self.G, self.names = A, G, names
        self.gamma, self.pi, self._eig = gamma, pi, eig
        self.A_inv, self.G_inv = A_inv, G_inv


class _AssembledTridiagonal(BlockTridiagonalInverse):
    """A ``BlockTridiagonalInverse`` whose Ψ, Appendix-B eigenpairs and last-layer inverses were
    computed across ranks and broadcast; ``apply``/``dense``/``with_gamma`` are the library's."""

    def __init__(self, *, A, G, A_off, G_off, gamma, dtype, names, pi, psi_A, psi_G, K_A, s_A, K_G, s_G,
                 last_A_inv, last_G_inv):  # noqa: D107
        self.damping, self.dtype, self.names = "factored", dtype, names
        self.A, self.G, self.A_off, self.G_off = A, G, A_off, G_off
        self.gamma, self.pi = gamma, pi
        self.psi_A, self.psi_G, self.K_A, self.s_A, self.K_G, self.s_G = psi_A, psi_G, K_A, s_A, K_G, s_G
        self.last_A_inv, self.last_G_inv = last_A_inv, last_G_inv
        self.clamped = sum((clamp_conditional(s_A[i], s_G[i]) for i in range(len(A) - 1)),
                           torch.zeros((), dtype=torch.int64, device=A[0].device))
