"""Reference losses in PyTorch (the fp32 truth the Triton kernels in kernels/ are tested against).

Conventions: ``mu`` and ``log_var`` are 1-D over candidates (``log_var`` = log sigma^2); ``win_idx`` /
``lose_idx`` are 1-D long over pairs; ``tie`` is an optional bool mask over pairs (for a tie the two
indices are simply the two tied candidates).

Rank modes (z = mu_w - mu_l, v = s_w^2 + s_l^2):
* ``thurstone``   -log Phi(z / sqrt(v)), evaluated in log space.
* ``bt_expected`` E_{x ~ N(z, v)} softplus(-x) by Gauss–Hermite quadrature: the exact expectation of the
  1000-sample Monte-Carlo estimate of EditReward/HPSv3 (``mc_bt_loss``) without its noise.
* ``bt``          softplus(-z): Bradley–Terry on mu only (sigma unused).

Ties (``ties="model"``, margin m = ``tie_margin`` > 0): three-outcome models, so win and tie
probabilities sum to one with the loss:
* thurstone: Glenn–David (1960): P(w > l) = Phi((z - m)/s), P(tie) = Phi((m - z)/s) - Phi((-m - z)/s).
* bt / bt_expected: Rao–Kupper (1967) with theta = e^m: P(w > l) = sigmoid(z - m),
  P(tie) = (theta^2 - 1) e^z / ((e^z + theta)(1 + theta e^z)); bt_expected takes its expectation over x.
They apply whenever a tie mask is passed (all pairs of a batch then use the same three-outcome model);
``tie=None`` (data without tie labels) gives the plain two-outcome formulas above. ``ties="ignore"`` drops
tie pairs and uses m = 0. A tie is never counted as a win.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

RANK_MODES = ("thurstone", "bt_expected", "bt")
TIE_MODES = ("model", "ignore")
GH_NODES = 20  # Gauss–Hermite order for bt_expected (exact for polynomials of degree < 40)
_gh_x, _gh_w = np.polynomial.hermite.hermgauss(GH_NODES)
GH_X = tuple(float(x) for x in _gh_x)
GH_W = tuple(float(w / math.sqrt(math.pi)) for w in _gh_w)  # weights of E over a standard normal via x*sqrt(2)
_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class _NegLogNdtr(torch.autograd.Function):
    """-log Phi(x) with a tail-stable gradient.

    torch's log_ndtr forward is accurate in the tails, but the backward of -log Phi, phi(x)/Phi(x),
    computed as exp(log phi - log Phi) cancels catastrophically for x << 0. Via erfcx:
    phi(x)/Phi(x) = sqrt(2/pi) / erfcx(-x/sqrt 2), finite for every x.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return -torch.special.log_ndtr(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        ratio = _SQRT_2_OVER_PI / torch.special.erfcx(-x / _SQRT2)
        return -g * ratio


def neg_log_ndtr(x: torch.Tensor) -> torch.Tensor:
    return _NegLogNdtr.apply(x)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurate near 0 and for very negative x (Maechler 2012)."""
    x = x.clamp(max=-1e-30)
    near = x > -math.log(2.0)
    # feed each branch only the inputs it is accurate for: torch.where would otherwise send the
    # other branch's inf gradient through as 0 * inf = NaN
    x_near = torch.where(near, x, torch.full_like(x, -1.0))
    x_far = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _log_phi_interval(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, stable in both tails and for narrow intervals.

    Reflect so the interval midpoint is <= 0. If the interval then straddles 0, use erf (a sum of two
    positive terms, no cancellation). Otherwise it lies in the lower tail: with the scaled
    complementary error function, log Phi(u) = log(erfcx(-u/sqrt2)/2) - u^2/2, and the quadratic
    terms differ by (b - a)(b + a)/2, formed exactly instead of by cancellation. Narrow intervals use
    a midpoint series.
    """
    flip = (a + b) > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    straddle = b > 0
    zero = torch.zeros_like(a)
    # each branch sees only inputs it is accurate for (torch.where passes 0 * inf = NaN gradients otherwise)
    a_s, b_s = torch.where(straddle, a, zero), torch.where(straddle, b, zero)
    mid = torch.log(0.5 * (torch.special.erf(b_s / _SQRT2) - torch.special.erf(a_s / _SQRT2)))
    a_t, b_t = torch.where(straddle, zero - 2.0, a), torch.where(straddle, zero - 1.0, b)
    diff = (torch.log(torch.special.erfcx(-a_t / _SQRT2)) - torch.log(torch.special.erfcx(-b_t / _SQRT2))
            - 0.5 * (a_t - b_t) * (a_t + b_t))  # log Phi(a) - log Phi(b) <= 0
    tail = -neg_log_ndtr(b_t) + _log1mexp(diff)
    # Narrow intervals (w (|c| + 1) small, c the midpoint): every form above cancels in fp32, so use
    # Phi(b) - Phi(a) = w phi(c) (1 + (c^2 - 1) w^2 / 24 + O(w^4 c^4)).
    w, c = b - a, 0.5 * (a + b)
    narrow = w * (c.abs() + 1.0) < 1e-2
    w_n = torch.where(narrow, w, torch.ones_like(w))
    c_n = torch.where(narrow, c, torch.zeros_like(c))
    series = torch.log(w_n) - 0.5 * c_n * c_n - _LOG_SQRT_2PI + torch.log1p((c_n * c_n - 1.0) * w_n * w_n / 24.0)
    return torch.where(narrow, series, torch.where(straddle, mid, tail))


def _pair_stats(mu, log_var, win_idx, lose_idx):
    z = mu[win_idx] - mu[lose_idx]
    # log v = log(e^{lv_w} + e^{lv_l}) without overflow for log_var up to +-30 (and far beyond)
    log_v = torch.logaddexp(log_var[win_idx], log_var[lose_idx])
    return z, log_v


def _thurstone(z, log_v, tie, m):
    inv_s = torch.exp(-0.5 * log_v)
    win = neg_log_ndtr((z - m) * inv_s)
    if tie is None or m == 0.0:
        return win
    z_tie = torch.where(tie, z, torch.zeros_like(z))  # keep non-tie rows out of the tie branch's gradient
    tie_nll = -_log_phi_interval((-m - z_tie) * inv_s, (m - z_tie) * inv_s)
    return torch.where(tie, tie_nll, win)


def _rao_kupper_nll(x, tie, m):
    """-log P under Rao–Kupper for a deterministic margin x (win: sigmoid(x - m))."""
    win = F.softplus(m - x)
    if tie is None or m == 0.0:
        return win
    tie_nll = (-math.log(math.expm1(2.0 * m)) - x + torch.logaddexp(x, torch.full_like(x, m))
               + F.softplus(x + m))
    return torch.where(tie, tie_nll, win)


def _bt_expected(z, log_v, tie, m):
    s = torch.exp(0.5 * log_v) * _SQRT2
    out = torch.zeros_like(z)
    for x_k, w_k in zip(GH_X, GH_W):
        out = out + w_k * _rao_kupper_nll(z + s * x_k, tie, m)
    return out


def check_rank_options(mode: str, ties: str, reduction: str) -> None:
    """Option checks shared by the reference and jrm_kernels."""
    if mode not in RANK_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {RANK_MODES}")
    if ties not in TIE_MODES:
        raise ValueError(f"ties={ties!r}: expected one of {TIE_MODES}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: expected mean, sum or none")


def resolve_ties(win_idx, lose_idx, tie, ties: str, tie_margin: float):
    """The pair set and margin a rank loss sees: ``ties="ignore"`` drops tie pairs; the three-outcome
    model (margin m) applies when the data carries tie labels (a mask, even all False); ``tie=None``
    means two-outcome data and gives the plain formulas. Shared by the reference and jrm_kernels."""
    if tie is not None and ties == "ignore":
        keep = ~tie
        win_idx, lose_idx, tie = win_idx[keep], lose_idx[keep], None
    m = float(tie_margin) if tie is not None else 0.0
    if tie is not None and m <= 0.0:
        raise ValueError("tie_margin must be > 0 when ties are modelled")
    return win_idx, lose_idx, tie, m


def gaussian_rank_loss(mu: torch.Tensor, log_var: torch.Tensor, win_idx: torch.Tensor, lose_idx: torch.Tensor,
                       tie: torch.Tensor | None = None, mode: str = "thurstone", reduction: str = "mean",
                       ties: str = "model", tie_margin: float = 0.5) -> torch.Tensor:
    """Uncertainty-aware pairwise ranking loss (see module docstring for the modes and tie models)."""
    check_rank_options(mode, ties, reduction)
    win_idx, lose_idx, tie_arg, m = resolve_ties(win_idx, lose_idx, tie, ties, tie_margin)
    dt = torch.promote_types(mu.dtype, torch.float32)  # at least fp32 (bf16 in, fp32 math; fp64 stays fp64)
    z, log_v = _pair_stats(mu.to(dt), log_var.to(dt), win_idx, lose_idx)
    if mode == "thurstone":
        per_pair = _thurstone(z, log_v, tie_arg, m)
    elif mode == "bt_expected":
        per_pair = _bt_expected(z, log_v, tie_arg, m)
    else:
        per_pair = _rao_kupper_nll(z, tie_arg, m)
    if reduction == "none":
        return per_pair
    if reduction == "sum":
        return per_pair.sum()
    return per_pair.sum() / max(per_pair.numel(), 1)


def mc_bt_loss(mu, log_var, win_idx, lose_idx, n_samples: int = 1000, generator: torch.Generator | None = None):
    """The EditReward/HPSv3-style baseline: sample each reward n times from N(mu, sigma^2) and average
    -log sigmoid(r_w - r_l) (reparameterised, so it is differentiable). Noisy and O(n) per pair."""
    sigma = torch.exp(0.5 * log_var)
    eps = torch.randn((n_samples, mu.numel()), generator=generator, dtype=mu.dtype, device=mu.device)
    r = mu.unsqueeze(0) + sigma.unsqueeze(0) * eps
    return F.softplus(-(r[:, win_idx] - r[:, lose_idx])).mean()


def masked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   bias: torch.Tensor | None = None, reduction: str = "mean", num_items: int | float | None = None,
                   ) -> torch.Tensor:
    """Cross-entropy of the LM head on labelled positions only (reference; projects only those rows).

    ``hidden`` [N, H], ``weight`` [V, H], ``labels`` [N]. ``mean`` divides by ``num_items`` when given
    (the labelled-token count across ranks and accumulation steps), else by the local count.
    """
    keep = labels != ignore_index
    h = hidden[keep].float()
    logits = h @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    per_tok = F.cross_entropy(logits, labels[keep], reduction="none")
    if reduction == "none":
        out = torch.zeros(labels.shape, dtype=per_tok.dtype, device=per_tok.device)
        return out.masked_scatter(keep, per_tok)
    total = per_tok.sum()
    if reduction == "sum":
        return total
    denom = num_items if num_items is not None else keep.sum()
    return total / torch.clamp(torch.as_tensor(denom, dtype=total.dtype, device=total.device), min=1)


def joint_loss(rank: torch.Tensor, lm: torch.Tensor, alpha: float) -> torch.Tensor:
    """L = (1 - alpha) * L_rank + alpha * L_LM."""
    return (1.0 - alpha) * rank + alpha * lm


ALPHA_SCHEDULES = ("constant", "linear", "cosine")


def alpha_at(step: int, alpha: float, schedule: str = "constant", start: float = 0.0, ramp_steps: int = 0) -> float:
    """Alpha at ``step``: constant, or a linear / cosine ramp from ``start`` to ``alpha`` over ``ramp_steps``."""
    if schedule not in ALPHA_SCHEDULES:
        raise ValueError(f"alpha schedule {schedule!r}: expected one of {ALPHA_SCHEDULES}")
    if schedule == "constant" or ramp_steps <= 0 or step >= ramp_steps:
        return float(alpha)
    t = max(step, 0) / ramp_steps
    if schedule == "cosine":
        t = 0.5 * (1.0 - math.cos(math.pi * t))
    return float(start + (alpha - start) * t)


def ranking_to_pairs(tiers: list[list[int]]) -> tuple[list[int], list[int], list[bool]]:
    """Expand ranking tiers (best first, ties within a tier) into (win, lose, tie) lists.

    Every candidate beats every candidate of a lower tier; candidates of one tier form tie pairs
    (each unordered pair once).
    """
    win, lose, tie = [], [], []
    for a, tier in enumerate(tiers):
        for i in range(len(tier)):
            for j in range(i + 1, len(tier)):
                win.append(tier[i]); lose.append(tier[j]); tie.append(True)
        for lower in tiers[a + 1:]:
            for w in tier:
                for l in lower:
                    win.append(w); lose.append(l); tie.append(False)
    return win, lose, tie
