"""The damped inverses of the approximate Fisher as independent pieces — per-factor Cholesky
inverses, eigendecompositions, or each layer's block-tridiagonal side — for
:func:`~kfac_lab.distributed.assignment.run_shared`, and their assembly into the library's inverse
classes (M&G 2015 §4.2, §4.3, §6.3, Appendix B; docs/architecture.md#distributed-k-fac)."""
from __future__ import annotations

import functools

from ..curvature import decompositions as dec
from ..curvature.ekfac import Basis
from ..curvature.inverses import (BlockDiagonalInverse, BlockTridiagonalInverse, add_to_diagonal, as_gamma,
                                  pi_factor, tridiagonal_side)
from .assignment import Task, tridiag_side_cost

__all__ = ["inverse_tasks", "eigen_tasks"]


def eigen_tasks(A: list, G: list, dtype, names: list[str]):
    """The eigendecompositions of every layer's ``A`` and ``G`` (in ``dtype``) as tasks, and a
    function giving them per layer as :class:`~kfac_lab.curvature.ekfac.Basis` (exact Tikhonov's
    ``eig`` pieces and EKFAC's eigenbasis)."""
    A = [a.to(dtype) for a in A]
    G = [g.to(dtype) for g in G]
    tasks: list[Task] = []
    for i in range(len(A)):
        for side, M in (("A", A[i]), ("G", G[i])):
            d = M.shape[0]
            tasks.append(Task(("eig", side, i), 4.0 * d**3, [(d,), (d, d)], [False, False],
                              functools.partial(lambda M, w: list(dec.eigh(M, w)), M, f"{side} of {names[i]}")))

    def assemble(results) -> list[Basis]:
        return [Basis(*results[("eig", "A", i)], *results[("eig", "G", i)]) for i in range(len(A))]
    return tasks, assemble


def inverse_tasks(inputs: dict, gammas: list, damping: str, dtype, names: list[str]):
    """The independent pieces of the inverses of ``inputs`` (``A``, ``G`` and, for the
    block-tridiagonal inverse, ``A_off``, ``G_off``) for every γ in ``gammas``, with their flop
    counts, and a function assembling the inverses (one per γ) from the pieces' results."""
    A = [a.to(dtype) for a in inputs["A"]]
    G = [g.to(dtype) for g in inputs["G"]]
    L = len(A)
    gam = [as_gamma(g, A[0]) for g in gammas]
    pi = [pi_factor(a, g) for a, g in zip(A, G)]
    tasks: list[Task] = []
    if inputs["A_off"] is None and damping == "tikhonov":
        tasks, bases = eigen_tasks(A, G, dtype, names)

        def assemble(results):
            eig = [((b.e_A, b.U_A), (b.e_G, b.U_G)) for b in bases(results)]
            return [BlockDiagonalInverse.from_pieces(A, G, g, damping_type=damping, inverse_dtype=dtype, names=names,
                                                     eig=eig) for g in gam]
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
            return [BlockDiagonalInverse.from_pieces(
                A, G, g, damping_type=damping, inverse_dtype=dtype, names=names,
                A_inv=[results[("inv", c, "A", i)][0] for i in range(L)],
                G_inv=[results[("inv", c, "G", i)][0] for i in range(L)]) for c, g in enumerate(gam)]
        return tasks, assemble

    if damping != "factored":
        raise ValueError("the block-tridiagonal inverse needs factored Tikhonov damping (damping='factored')")
    A_off = [t.to(dtype) for t in inputs["A_off"]]
    G_off = [t.to(dtype) for t in inputs["G_off"]]

    def side(F, F_off, i, shift_i, shift_next, label):
        L_next = dec.cholesky(add_to_diagonal(F[i + 1], shift_next), f"damped {label} of {names[i + 1]}")
        L_i = dec.cholesky(add_to_diagonal(F[i], shift_i), f"damped {label} of {names[i]}")
        return list(tridiagonal_side(L_i, L_next, F_off[i], f"Σ {label}-side of {names[i]}"))

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
            out.append(BlockTridiagonalInverse.from_pieces(
                A, G, A_off, G_off, g, inverse_dtype=dtype, names=names,
                sides_A=[r("A", i) for i in range(L - 1)], sides_G=[r("G", i) for i in range(L - 1)],
                last_A_inv=results[("last", c, "A")][0], last_G_inv=results[("last", c, "G")][0]))
        return out
    return tasks, assemble

