"""CPU path of the Gaussian ranking loss: the same closed-form forward *and* gradient as the Triton kernel,
in vectorised PyTorch.

Why not just call the reference? Its autograd graph for ``bt_expected`` holds 20 quadrature nodes times a
handful of ops per pair; here the forward also yields dL/dz and dL/dlog_v per pair (a few floats), and the
backward is two ``index_add_`` scatters — repeated candidates accumulate exactly like the kernel's atomics.
"""
from __future__ import annotations

import math

import torch

from ._rules import GH_W, GH_X

SQRT2 = math.sqrt(2.0)
INV_SQRT2 = 1.0 / SQRT2
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
NARROW = 0.01  # tie intervals narrower than this (relative to max(|centre|, 1)) use a Taylor series
MODE_IDS = {"thurstone": 0, "bt_expected": 1, "bt": 2}


def rao_kupper_const(m: float) -> float:
    """-log(theta^2 - 1) with theta = e^m: the constant of the Rao–Kupper tie likelihood."""
    return -math.log(math.expm1(2.0 * m)) if m > 0 else 0.0


def _neg_log_ndtr_grad(u):
    """(-log Phi(u), d/du) via erfcx of a non-negative argument only (no overflow, no cancellation)."""
    ex = torch.special.erfcx(u.abs() * INV_SQRT2)
    e = torch.exp(-0.5 * u * u)
    neg = u < 0
    loss = torch.where(neg, 0.5 * u * u - torch.log(0.5 * ex), -torch.log1p(-0.5 * ex * e))
    ratio = torch.where(neg, SQRT_2_OVER_PI / ex, SQRT_2_OVER_PI * e / (2.0 - ex * e))
    return loss, -ratio


def _neg_log_interval_grad(c, h):
    """-log(Phi(c + h) - Phi(c - h)) for h > 0 and its derivatives w.r.t. the centre c and half-width h.

    Reflected so the midpoint is <= 0; a straddling interval uses erf (a sum of positives), a tail interval
    log Phi(b) + log(1 - Phi(a)/Phi(b)) with erfcx, the quadratic difference formed exactly as 2 h c.
    """
    flip = c > 0
    cc = torch.where(flip, -c, c)
    a, b = cc - h, cc + h
    straddle = b > 0
    # straddle: D = (erf(b/√2) - erf(a/√2)) / 2
    d_mid = 0.5 * (torch.special.erf(b * INV_SQRT2) - torch.special.erf(a * INV_SQRT2))
    loss_mid = -torch.log(d_mid)
    ra_mid = INV_SQRT_2PI * torch.exp(-0.5 * a * a) / d_mid
    rb_mid = INV_SQRT_2PI * torch.exp(-0.5 * b * b) / d_mid
    # tail (b <= 0): log D = log Phi(b) + log(1 - e^diff), diff = log Phi(a) - log Phi(b) <= 0
    bt = torch.where(straddle, torch.full_like(b, -1.0), b)
    at = bt - 2.0 * h
    ex_a = torch.special.erfcx(-at * INV_SQRT2)
    ex_b = torch.special.erfcx(-bt * INV_SQRT2)
    quad = 2.0 * h * (bt - h)  # -(a^2 - b^2)/2 = 2 h c  (<= 0)
    diff = torch.log(ex_a) - torch.log(ex_b) + quad
    diff = diff.clamp(max=-1e-30)
    one_minus = -torch.expm1(diff)
    near = diff > -math.log(2.0)
    log1mexp = torch.where(near, torch.log(one_minus), torch.log1p(-torch.exp(torch.where(near, -1.0, diff))))
    log_phi_b = -0.5 * bt * bt + torch.log(0.5 * ex_b)
    loss_tail = -(log_phi_b + log1mexp)
    rb_tail = SQRT_2_OVER_PI / ex_b / one_minus
    ra_tail = rb_tail * torch.exp(quad)
    loss = torch.where(straddle, loss_mid, loss_tail)
    ra = torch.where(straddle, ra_mid, ra_tail)  # phi(a)/D in reflected coordinates
    rb = torch.where(straddle, rb_mid, rb_tail)
    # dL/da = phi(a)/D, dL/db = -phi(b)/D in original coordinates; reflection swaps the roles of a and b
    ga = torch.where(flip, rb, ra)
    gb = -torch.where(flip, ra, rb)
    # narrow interval (h max(|c|, 1) < 0.01, e.g. huge variances): both branches above cancel in fp32; use
    # D = 2 h phi(c) (1 + q), q = (c^2 - 1) h^2 / 6 + (c^4 - 6 c^2 + 3) h^4 / 120 (Taylor, next term ~1e-11)
    narrow = h * torch.clamp(c.abs(), min=1.0) < NARROW
    c = torch.where(narrow, c, 0.0)  # other lanes: harmless inputs (no inf / NaN even where not selected)
    h = torch.where(narrow, h, NARROW)
    c2, h2 = c * c, h * h
    q = (c2 - 1.0) * h2 / 6.0 + (c2 * c2 - 6.0 * c2 + 3.0) * h2 * h2 / 120.0
    dq_dc = c * h2 / 3.0 + (4.0 * c2 - 12.0) * c * h2 * h2 / 120.0
    dq_dh = (c2 - 1.0) * h / 3.0 + (c2 * c2 - 6.0 * c2 + 3.0) * h2 * h / 30.0
    loss_n = -torch.log(2.0 * h) + 0.5 * c2 + LOG_SQRT_2PI - torch.log1p(q)
    dl_dc = c - dq_dc / (1.0 + q)
    dl_dh = -1.0 / h - dq_dh / (1.0 + q)
    loss = torch.where(narrow, loss_n, loss)
    # derivatives w.r.t. centre and half-width (a = c - h, b = c + h): no a*ga + b*gb cancellation
    return loss, torch.where(narrow, dl_dc, ga + gb), torch.where(narrow, dl_dh, gb - ga)


def _rao_kupper_grad(x, tie, m, const):
    """Rao–Kupper -log P for a margin x and d/dx (win: softplus(m - x); tie: see jrm_dist.losses)."""
    win = torch.nn.functional.softplus(m - x)
    dwin = -torch.sigmoid(m - x)
    if tie is None:
        return win, dwin
    tie_nll = const - x + torch.logaddexp(x, torch.full_like(x, m)) + torch.nn.functional.softplus(x + m)
    dtie = -1.0 + torch.sigmoid(x - m) + torch.sigmoid(x + m)
    return torch.where(tie, tie_nll, win), torch.where(tie, dtie, dwin)


def rank_terms(mu, log_var, win_idx, lose_idx, tie, mode: str, m: float):
    """Per-pair loss and the per-pair gradient coefficients (dL/dz, dL/dlv_w, dL/dlv_l), at least fp32."""
    dt = torch.promote_types(mu.dtype, torch.float32)  # fp32 math for bf16/fp16, fp64 stays fp64
    mu = mu.to(dt)
    lv = log_var.to(dt)
    z = mu[win_idx] - mu[lose_idx]
    lv_w, lv_l = lv[win_idx], lv[lose_idx]
    log_v = torch.logaddexp(lv_w, lv_l)
    p_w = torch.sigmoid(lv_w - lv_l)  # d log_v / d lv_w
    if mode == "thurstone":
        inv_s = torch.exp(-0.5 * log_v)
        u = (z - m) * inv_s
        loss, gu = _neg_log_ndtr_grad(u)
        gz, glv = gu * inv_s, gu * (-0.5 * u)
        if tie is not None:
            zt = torch.where(tie, z, torch.zeros_like(z))
            c, h = -zt * inv_s, m * inv_s
            t_loss, gc, gh = _neg_log_interval_grad(c, h)
            loss = torch.where(tie, t_loss, loss)
            gz = torch.where(tie, -inv_s * gc, gz)  # c = -z / s, h = m / s: both scale as s^-1
            glv = torch.where(tie, -0.5 * (c * gc + h * gh), glv)
    elif mode == "bt_expected":
        s2 = torch.exp(0.5 * log_v) * SQRT2
        const = rao_kupper_const(m)
        loss = torch.zeros_like(z)
        gz = torch.zeros_like(z)
        gs = torch.zeros_like(z)
        for x_k, w_k in zip(GH_X, GH_W):
            nll, d = _rao_kupper_grad(z + s2 * x_k, tie, m, const)
            loss = loss + w_k * nll
            gz = gz + w_k * d
            gs = gs + (w_k * x_k) * d
        glv = 0.5 * s2 * gs
    else:
        loss, gz = _rao_kupper_grad(z, tie, m, rao_kupper_const(m))
        glv = torch.zeros_like(z)
    return loss, gz, glv * p_w, glv * (1.0 - p_w)


class RankLossTorch(torch.autograd.Function):
    """Analytic forward/backward; the backward scatters per-pair coefficients with ``index_add_``."""

    @staticmethod
    def forward(ctx, mu, log_var, win_idx, lose_idx, tie, mode, m, reduction):
        loss, gz, gw, gl = rank_terms(mu.detach(), log_var.detach(), win_idx, lose_idx, tie, mode, m)
        ctx.save_for_backward(win_idx, lose_idx, gz, gw, gl)
        ctx.meta = (mu.numel(), mu.dtype, log_var.dtype, reduction, mode)
        if reduction == "none":
            return loss
        total = loss.sum()
        return total if reduction == "sum" else total / max(loss.numel(), 1)

    @staticmethod
    def backward(ctx, g):
        win_idx, lose_idx, gz, gw, gl = ctx.saved_tensors
        k, mu_dtype, lv_dtype, reduction, mode = ctx.meta
        g = g.to(gz.dtype)
        if reduction == "mean":
            g = g / max(gz.numel(), 1)
        dz = gz * g
        dmu = torch.zeros(k, dtype=gz.dtype, device=gz.device)
        dmu.index_add_(0, win_idx, dz).index_add_(0, lose_idx, -dz)
        dlv = torch.zeros(k, dtype=gz.dtype, device=gz.device)
        if mode != "bt":
            dlv.index_add_(0, win_idx, gw * g).index_add_(0, lose_idx, gl * g)
        return dmu.to(mu_dtype), dlv.to(lv_dtype), None, None, None, None, None, None
