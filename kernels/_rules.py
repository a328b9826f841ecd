"""What the kernels decide for themselves, without jrm_dist: the Gauss–Hermite rule of ``bt_expected``, the option
checks and the tie rule. jrm_kernels is a leaf (torch and triton only, like Liger-Kernel's ops), so the fp32
reference in jrm_dist/losses.py and these kernels are two independent implementations that the tests compare.

Quadrature: Golub–Welsch. The nodes of the n-point rule for the weight e^{-x^2} are the eigenvalues of the
symmetric tridiagonal Jacobi matrix of the orthonormal Hermite polynomials (zero diagonal, off-diagonal
sqrt(k/2)); one Newton step on p_n in float64 polishes them, and the weight of node x is 1 / sum_k p_k(x)^2
(the Christoffel function). Weights are normalised to sum to 1, i.e. E_{x ~ N(0, 1/2)}: E_{y ~ N(z, v)} f(y) =
sum_i w_i f(z + sqrt(2 v) x_i).
"""
from __future__ import annotations

import math

import torch

GH_ORDER = 20  # nodes of the bt_expected rule (exact for polynomials of degree < 40)
RANK_MODES = ("thurstone", "bt_expected", "bt")
TIE_MODES = ("model", "ignore")
REDUCTIONS = ("mean", "sum", "none")


def _orthonormal_hermite(x: torch.Tensor, n: int) -> torch.Tensor:
    """[n + 1, len(x)]: p_0..p_n at x, orthonormal for the weight e^{-x^2} (three-term recurrence, no overflow)."""
    p = torch.empty((n + 1, x.numel()), dtype=torch.float64, device="cpu")
    p[0] = math.pi ** -0.25
    if n >= 1:
        p[1] = math.sqrt(2.0) * x * p[0]
    for k in range(1, n):
        p[k + 1] = math.sqrt(2.0 / (k + 1)) * x * p[k] - math.sqrt(k / (k + 1)) * p[k - 1]
    return p


def gauss_hermite(n: int = GH_ORDER) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(nodes, weights) of the n-point Gauss–Hermite rule, nodes ascending, weights summing to 1."""
    if n < 1:
        raise ValueError(f"Gauss–Hermite order must be >= 1, got {n}")
    # device="cpu": this runs at import, possibly inside a caller's ``with torch.device("meta")``
    off = torch.sqrt(torch.arange(1, n, dtype=torch.float64, device="cpu") / 2.0)
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    x = torch.linalg.eigvalsh(jacobi)
    p = _orthonormal_hermite(x, n)
    x = x - p[n] / (math.sqrt(2.0 * n) * p[n - 1])  # Newton: p_n' = sqrt(2n) p_{n-1}
    w = 1.0 / (_orthonormal_hermite(x, n - 1) ** 2).sum(0)
    x, w = (x - x.flip(0)) / 2.0, (w + w.flip(0)) / 2.0  # the rule is symmetric: make it exactly so
    w = w / w.sum()
    return tuple(x.tolist()), tuple(w.tolist())


GH_X, GH_W = gauss_hermite(GH_ORDER)


def check_rank_options(mode: str, ties: str, reduction: str) -> None:
    for name, value, allowed in (("mode", mode, RANK_MODES), ("ties", ties, TIE_MODES),
                                 ("reduction", reduction, REDUCTIONS)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}: expected one of {allowed}")


def resolve_ties(win_idx: torch.Tensor, lose_idx: torch.Tensor, tie: torch.Tensor | None, ties: str,
                 tie_margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """(win, lose, tie mask, margin) the loss sees. Tie labels present (a mask, even all False): the three-outcome
    model with margin ``tie_margin``, or with ``ties="ignore"`` the tie pairs dropped and the plain formulas
    (margin 0). No labels (``tie=None``): the plain formulas. A tie never counts as a win."""
    if tie is None:
        return win_idx, lose_idx, None, 0.0
    if ties == "ignore":
        decided = tie.logical_not()
        return win_idx[decided], lose_idx[decided], None, 0.0
    margin = float(tie_margin)
    if not margin > 0.0:
        raise ValueError(f"tie_margin must be > 0 when ties are modelled (ties='model'), got {tie_margin}")
    return win_idx, lose_idx, tie, margin
