"""Fused linear + masked cross-entropy in Triton; the [N, V] logits never exist.

Only labelled rows are projected (the wrapper compacts them). Forward: one program per BLOCK_N rows walks the
vocabulary in BLOCK_V tiles (each tile = sum over BLOCK_K slices of hidden @ weight^T, fp32 accumulation), keeping
an online log-sum-exp, the target logit and the logit sum (label smoothing); it writes per-row loss and lse.
Backward: one program per (row block, V block) recomputes its tile, forms dlogits from the saved lse, and
atomically adds dlogits @ W into dhidden and dlogits^T @ h into dweight (both fp32 buffers) slice by slice of H.
Extras, all fp32: label smoothing eps (as F.cross_entropy), z-loss zc * lse^2, soft-cap c * tanh(x / c).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tl_math as tm


@triton.jit
def _tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_rows, vocab, hid, softcap,
          HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 logits tile [BLOCK_N, BLOCK_V] (bias, soft-cap applied; -inf outside the vocabulary) and tanh."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hid, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(h_ptr + offs_n[:, None] * hid + offs_k[None, :],
                    mask=(offs_n[:, None] < n_rows) & (offs_k[None, :] < hid), other=0.0)
        b = tl.load(w_ptr + offs_v[:, None] * hid + offs_k[None, :],
                    mask=(offs_v[:, None] < vocab) & (offs_k[None, :] < hid), other=0.0)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(b))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=offs_v < vocab, other=0.0).to(tl.float32)[None, :]
    t = acc
    if SOFTCAP:
        t = tm.tanh(acc / softcap)
        acc = t * softcap
    acc = tl.where(offs_v[None, :] < vocab, acc, float("-inf"))
    return acc, t


@triton.jit
def _ce_fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, loss_ptr, lse_ptr, n_rows, vocab, hid, eps, zc, softcap,
                   HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    y = tl.load(y_ptr + offs_n, mask=row_ok, other=-1)
    m_run = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_run = tl.zeros((BLOCK_N,), tl.float32)
    tgt = tl.zeros((BLOCK_N,), tl.float32)
    sum_x = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        x, _ = _tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_rows, vocab, hid, softcap,
                     HAS_BIAS, SOFTCAP, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        m_new = tl.maximum(m_run, tl.max(x, axis=1))
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m_run = m_new
        tgt += tl.sum(tl.where(offs_v[None, :] == y[:, None], x, 0.0), axis=1)
        if SMOOTH:
            sum_x += tl.sum(tl.where(offs_v[None, :] < vocab, x, 0.0), axis=1)
    lse = m_run + tl.log(s_run)
    loss = lse - (1.0 - eps) * tgt - eps * sum_x / vocab + zc * lse * lse
    tl.store(lse_ptr + offs_n, lse, mask=row_ok)
    tl.store(loss_ptr + offs_n, loss, mask=row_ok)


@triton.jit
def _ce_bwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr, n_rows, vocab, hid,
                   eps, zc, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                   NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < n_rows
    col_ok = offs_v < vocab
    x, t = _tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_rows, vocab, hid, softcap,
                 HAS_BIAS, SOFTCAP, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
    y = tl.load(y_ptr + offs_n, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=row_ok, other=0.0)
    # d loss / d x = (1 + 2 zc lse) p - eps / V - (1 - eps) [v == y], times the incoming gradient
    dx = tl.exp(x - lse[:, None]) * (g * (1.0 + 2.0 * zc * lse))[:, None] - (g * (eps / vocab))[:, None]
    dx -= tl.where(offs_v[None, :] == y[:, None], (g * (1.0 - eps))[:, None], 0.0)
    if SOFTCAP:
        dx *= 1.0 - t * t
    dx = tl.where(row_ok[:, None] & col_ok[None, :], dx, 0.0)
    if NEED_B:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dx, axis=0), mask=col_ok)
    for k0 in range(0, hid, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < hid
        if NEED_H:
            wb = tl.load(w_ptr + offs_v[:, None] * hid + offs_k[None, :], mask=col_ok[:, None] & k_ok[None, :],
                         other=0.0)
            if UPCAST:
                part = tl.dot(dx, wb.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(dx.to(wb.dtype), wb)
            tl.atomic_add(dh_ptr + offs_n[:, None] * hid + offs_k[None, :], part,
                          mask=row_ok[:, None] & k_ok[None, :])
        if NEED_W:
            hb = tl.load(h_ptr + offs_n[:, None] * hid + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)
            if UPCAST:
                part_w = tl.dot(tl.trans(dx), hb.to(tl.float32), input_precision="ieee")
            else:
                part_w = tl.dot(tl.trans(dx.to(hb.dtype)), hb)
            tl.atomic_add(dw_ptr + offs_v[:, None] * hid + offs_k[None, :], part_w,
                          mask=col_ok[:, None] & k_ok[None, :])


def _blocks(device: torch.device):
    """Tile sizes: small under the interpreter (CPU), GEMM-sized on a GPU."""
    if device.type == "cuda":
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64)
    return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16)


class LinearCETriton(torch.autograd.Function):
    """Returns the per-row loss (reduction 'none', 0 at ignored rows) or its sum ('sum')."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, eps, zc, softcap):
        rows = (labels != ignore_index).nonzero().squeeze(1)
        h = hidden.detach()[rows].contiguous()
        w = weight.detach().contiguous()
        b = bias.detach().contiguous() if bias is not None else w
        y = labels[rows].to(torch.int64).contiguous()
        n, vocab, hid = h.shape[0], w.shape[0], w.shape[1]
        loss = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        blk = _blocks(h.device)
        upcast = h.device.type != "cuda" or h.dtype == torch.float32 or w.dtype == torch.float32 \
            or h.dtype != w.dtype
        flags = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, UPCAST=upcast)
        if n:
            _ce_fwd_kernel[(triton.cdiv(n, blk["BLOCK_N"]),)](
                h, w, b, y, loss, lse, n, vocab, hid, float(eps), float(zc), float(softcap or 1.0),
                SMOOTH=eps > 0, **flags, **blk)
        ctx.save_for_backward(h, w, bias, rows, y, lse)
        ctx.meta = (reduction, eps, zc, softcap, flags, blk, hidden.shape, hidden.dtype)
        if reduction == "none":
            out = torch.zeros(labels.shape[0], dtype=torch.float32, device=h.device)
            out[rows] = loss
            return out
        return loss.sum()

    @staticmethod
    def backward(ctx, g):
        h, w, bias, rows, y, lse = ctx.saved_tensors
        reduction, eps, zc, softcap, flags, blk, h_shape, h_dtype = ctx.meta
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab, hid = h.shape[0], w.shape[0], w.shape[1]
        g = g.float()
        gr = (g[rows] if reduction == "none" else g.expand(n)).contiguous()
        dh = torch.zeros((n, hid), dtype=torch.float32, device=h.device)
        dw = torch.zeros((vocab, hid), dtype=torch.float32, device=h.device) if need_w else dh
        db = torch.zeros(vocab, dtype=torch.float32, device=h.device) if need_b else dh
        if n:
            grid = (triton.cdiv(n, blk["BLOCK_N"]), triton.cdiv(vocab, blk["BLOCK_V"]))
            _ce_bwd_kernel[grid](h, w, bias if bias is not None else w, y, lse, gr, dh, dw, db, n, vocab, hid,
                                 float(eps), float(zc), float(softcap or 1.0), NEED_H=bool(need_h),
                                 NEED_W=bool(need_w), NEED_B=bool(need_b), **flags, **blk)
        dhidden = None
        if need_h:
            dhidden = torch.zeros(h_shape, dtype=h_dtype, device=h.device)
            dhidden[rows] = dh.to(h_dtype)
        dweight = dw.to(w.dtype) if need_w else None
        dbias = db.to(bias.dtype) if need_b else None
        return dhidden, dweight, dbias, None, None, None, None, None, None
