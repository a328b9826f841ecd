"""Fused Gaussian ranking loss in Triton: one forward kernel over pairs, one backward scatter kernel.

The forward evaluates, per pair, the loss of the chosen mode (thurstone / bt_expected with the 20 Gauss–Hermite
nodes unrolled / bt, with Glenn–David or Rao–Kupper ties) *and* its derivatives w.r.t. the pair margin z and the
two log-variances, in one pass (the math is the same closed form as ``_rank_torch.rank_terms``; see
jrm_dist/losses.py for the models). The backward multiplies those 3 floats per pair by the incoming gradient and
accumulates into d/dmu and d/dlog_var with atomics, so a candidate that appears in many pairs gets the sum.
Loads are upcast to fp32 right after ``tl.load`` (bf16 inputs are correct under the interpreter too).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _tl_math as tm
from ._rules import GH_W, GH_X
from ._rank_torch import MODE_IDS, rao_kupper_const

NARROW: tl.constexpr = tl.constexpr(0.01)  # = _rank_torch.NARROW

BLOCK = 128
_SQRT2 = math.sqrt(2.0)
_INV_SQRT2 = 1.0 / _SQRT2
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_LN2 = math.log(2.0)


@triton.jit
def _neg_log_ndtr_grad(u):
    """(-log Phi(u), d/du), erfcx only of |u|/sqrt2 >= 0."""
    ex = tm.erfcx_pos(tl.abs(u) * 0.7071067811865476)
    e = tl.exp(-0.5 * u * u)
    neg = u < 0
    loss = tl.where(neg, 0.5 * u * u - tl.log(0.5 * ex), -tm.log1p(-0.5 * ex * e))
    ratio = tl.where(neg, 0.7978845608028654 / ex, 0.7978845608028654 * e / (2.0 - ex * e))
    return loss, -ratio


@triton.jit
def _neg_log_interval_grad(c, h):
    """-log(Phi(c + h) - Phi(c - h)), h > 0, and d/dc, d/dh; see _rank_torch._neg_log_interval_grad."""
    flip = c > 0
    cc = tl.where(flip, -c, c)
    a = cc - h
    b = cc + h
    straddle = b > 0
    d_mid = 0.5 * (tl.math.erf(b * 0.7071067811865476) - tl.math.erf(a * 0.7071067811865476))
    d_mid = tl.where(straddle, d_mid, 1.0)
    loss_mid = -tl.log(d_mid)
    ra_mid = 0.3989422804014327 * tl.exp(-0.5 * a * a) / d_mid
    rb_mid = 0.3989422804014327 * tl.exp(-0.5 * b * b) / d_mid
    bt = tl.where(straddle, -1.0, b)
    at = bt - 2.0 * h
    ex_a = tm.erfcx_pos(-at * 0.7071067811865476)
    ex_b = tm.erfcx_pos(-bt * 0.7071067811865476)
    quad = 2.0 * h * (bt - h)
    diff = tl.minimum(tl.log(ex_a) - tl.log(ex_b) + quad, -1e-30)
    one_minus = -tm.expm1(diff)
    near = diff > -0.6931471805599453
    log1mexp = tl.where(near, tl.log(one_minus), tm.log1p(-tl.exp(tl.where(near, -1.0, diff))))
    loss_tail = -(-0.5 * bt * bt + tl.log(0.5 * ex_b) + log1mexp)
    rb_tail = 0.7978845608028654 / ex_b / one_minus
    ra_tail = rb_tail * tl.exp(quad)
    loss = tl.where(straddle, loss_mid, loss_tail)
    ra = tl.where(straddle, ra_mid, ra_tail)
    rb = tl.where(straddle, rb_mid, rb_tail)
    ga = tl.where(flip, rb, ra)
    gb = -tl.where(flip, ra, rb)
    # narrow interval: Taylor series of D = 2 h phi(c) (1 + q), see _rank_torch._neg_log_interval_grad
    narrow = h * tl.maximum(tl.abs(c), 1.0) < NARROW
    cn = tl.where(narrow, c, 0.0)  # other lanes get harmless inputs (no inf / NaN even where not selected)
    hn = tl.where(narrow, h, NARROW)
    c2 = cn * cn
    h2 = hn * hn
    q = (c2 - 1.0) * h2 / 6.0 + (c2 * c2 - 6.0 * c2 + 3.0) * h2 * h2 / 120.0
    dq_dc = cn * h2 / 3.0 + (4.0 * c2 - 12.0) * cn * h2 * h2 / 120.0
    dq_dh = (c2 - 1.0) * hn / 3.0 + (c2 * c2 - 6.0 * c2 + 3.0) * h2 * hn / 30.0
    loss_n = -tl.log(2.0 * hn) + 0.5 * c2 + 0.9189385332046727 - tm.log1p(q)
    dl_dc = cn - dq_dc / (1.0 + q)
    dl_dh = -1.0 / hn - dq_dh / (1.0 + q)
    loss = tl.where(narrow, loss_n, loss)
    # derivatives w.r.t. centre and half-width (a = c - h, b = c + h): no a*ga + b*gb cancellation
    return loss, tl.where(narrow, dl_dc, ga + gb), tl.where(narrow, dl_dh, gb - ga)


@triton.jit
def _rao_kupper_grad(x, is_tie, m, rk_const, HAS_TIE: tl.constexpr):
    """Rao–Kupper -log P for margin x and d/dx."""
    loss = tm.softplus(m - x)
    d = -tm.sigmoid(m - x)
    if HAS_TIE:
        lae = tl.maximum(x, m) + tm.log1p(tl.exp(-tl.abs(x - m)))
        tie_nll = rk_const - x + lae + tm.softplus(x + m)
        dtie = -1.0 + tm.sigmoid(x - m) + tm.sigmoid(x + m)
        loss = tl.where(is_tie, tie_nll, loss)
        d = tl.where(is_tie, dtie, d)
    return loss, d


@triton.jit
def _rank_fwd_kernel(mu_ptr, lv_ptr, win_ptr, lose_ptr, tie_ptr, ghx_ptr, ghw_ptr,
                     loss_ptr, gz_ptr, gw_ptr, gl_ptr, n_pairs, m, rk_const,
                     MODE: tl.constexpr, HAS_TIE: tl.constexpr, NEED_GRAD: tl.constexpr,
                     N_NODES: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_pairs
    w = tl.load(win_ptr + offs, mask=mask, other=0)
    l = tl.load(lose_ptr + offs, mask=mask, other=0)
    z = tl.load(mu_ptr + w, mask=mask, other=0.0).to(tl.float32) - tl.load(mu_ptr + l, mask=mask, other=0.0).to(
        tl.float32)
    lv_w = tl.load(lv_ptr + w, mask=mask, other=0.0).to(tl.float32)
    lv_l = tl.load(lv_ptr + l, mask=mask, other=0.0).to(tl.float32)
    log_v = tl.maximum(lv_w, lv_l) + tm.log1p(tl.exp(-tl.abs(lv_w - lv_l)))
    p_w = tm.sigmoid(lv_w - lv_l)
    if HAS_TIE:
        is_tie = tl.load(tie_ptr + offs, mask=mask, other=0) != 0
    else:
        is_tie = offs < 0
    if MODE == 0:  # thurstone (Glenn–David ties)
        inv_s = tl.exp(-0.5 * log_v)
        u = (z - m) * inv_s
        loss, gu = _neg_log_ndtr_grad(u)
        gz = gu * inv_s
        glv = gu * (-0.5 * u)
        if HAS_TIE:
            zt = tl.where(is_tie, z, 0.0)
            c = -zt * inv_s
            h = m * inv_s
            t_loss, gc, gh = _neg_log_interval_grad(c, h)
            loss = tl.where(is_tie, t_loss, loss)
            gz = tl.where(is_tie, -inv_s * gc, gz)
            glv = tl.where(is_tie, -0.5 * (c * gc + h * gh), glv)
    elif MODE == 1:  # bt_expected: E over N(z, v) by Gauss–Hermite, nodes unrolled
        s2 = tl.exp(0.5 * log_v) * 1.4142135623730951
        loss = tl.zeros_like(z)
        gz = tl.zeros_like(z)
        gs = tl.zeros_like(z)
        for k in tl.static_range(N_NODES):
            x_k = tl.load(ghx_ptr + k)
            w_k = tl.load(ghw_ptr + k)
            nll, d = _rao_kupper_grad(z + s2 * x_k, is_tie, m, rk_const, HAS_TIE)
            loss += w_k * nll
            gz += w_k * d
            gs += (w_k * x_k) * d
        glv = 0.5 * s2 * gs
    else:  # bt on mu only
        loss, gz = _rao_kupper_grad(z, is_tie, m, rk_const, HAS_TIE)
        glv = tl.zeros_like(z)
    tl.store(loss_ptr + offs, loss, mask=mask)
    if NEED_GRAD:
        tl.store(gz_ptr + offs, gz, mask=mask)
        tl.store(gw_ptr + offs, glv * p_w, mask=mask)
        tl.store(gl_ptr + offs, glv * (1.0 - p_w), mask=mask)


@triton.jit
def _rank_bwd_kernel(win_ptr, lose_ptr, gz_ptr, gw_ptr, gl_ptr, gout_ptr, dmu_ptr, dlv_ptr, n_pairs, scale,
                     PER_PAIR: tl.constexpr, HAS_LV: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_pairs
    if PER_PAIR:
        g = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale
    else:
        g = tl.load(gout_ptr).to(tl.float32) * scale
    w = tl.load(win_ptr + offs, mask=mask, other=0)
    l = tl.load(lose_ptr + offs, mask=mask, other=0)
    dz = tl.load(gz_ptr + offs, mask=mask, other=0.0) * g
    tl.atomic_add(dmu_ptr + w, dz, mask=mask)
    tl.atomic_add(dmu_ptr + l, -dz, mask=mask)
    if HAS_LV:
        tl.atomic_add(dlv_ptr + w, tl.load(gw_ptr + offs, mask=mask, other=0.0) * g, mask=mask)
        tl.atomic_add(dlv_ptr + l, tl.load(gl_ptr + offs, mask=mask, other=0.0) * g, mask=mask)


_GH_CACHE: dict = {}


def _gh_tables(device):
    if device not in _GH_CACHE:
        _GH_CACHE[device] = (torch.tensor(GH_X, dtype=torch.float32, device=device),
                             torch.tensor(GH_W, dtype=torch.float32, device=device))
    return _GH_CACHE[device]


class RankLossTriton(torch.autograd.Function):
    """Autograd wrapper: forward kernel (loss + per-pair gradient coefficients), backward atomic scatter."""

    @staticmethod
    def forward(ctx, mu, log_var, win_idx, lose_idx, tie, mode, m, reduction):
        mu_c, lv_c = mu.detach().contiguous(), log_var.detach().contiguous()
        win_c, lose_c = win_idx.contiguous(), lose_idx.contiguous()
        n = win_c.numel()
        dev = mu.device
        loss = torch.empty(n, dtype=torch.float32, device=dev)
        need_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        coef = [torch.empty(n if need_grad else 1, dtype=torch.float32, device=dev) for _ in range(3)]
        has_tie = tie is not None
        tie_c = tie.to(torch.int8).contiguous() if has_tie else loss  # dummy pointer when no ties
        ghx, ghw = _gh_tables(dev)
        if n:
            _rank_fwd_kernel[(triton.cdiv(n, BLOCK),)](
                mu_c, lv_c, win_c, lose_c, tie_c, ghx, ghw, loss, coef[0], coef[1], coef[2], n, float(m),
                rao_kupper_const(m) if has_tie else 0.0, MODE=MODE_IDS[mode], HAS_TIE=has_tie,
                NEED_GRAD=need_grad, N_NODES=len(GH_X), BLOCK=BLOCK)
        ctx.save_for_backward(win_c, lose_c, *coef)
        ctx.meta = (mu.numel(), mu.dtype, log_var.dtype, reduction, mode)
        if reduction == "none":
            return loss
        total = loss.sum()
        return total if reduction == "sum" else total / max(n, 1)

    @staticmethod
    def backward(ctx, g):
        win_c, lose_c, gz, gw, gl = ctx.saved_tensors
        k, mu_dtype, lv_dtype, reduction, mode = ctx.meta
        n = win_c.numel()
        dmu = torch.zeros(k, dtype=torch.float32, device=gz.device)
        dlv = torch.zeros(k, dtype=torch.float32, device=gz.device)
        if n:
            scale = 1.0 / n if reduction == "mean" else 1.0
            _rank_bwd_kernel[(triton.cdiv(n, BLOCK),)](
                win_c, lose_c, gz, gw, gl, g.contiguous(), dmu, dlv, n, scale,
                PER_PAIR=reduction == "none", HAS_LV=mode != "bt", BLOCK=BLOCK)
        return dmu.to(mu_dtype), dlv.to(lv_dtype), None, None, None, None, None, None
