"""CPU path of the fused linear + masked cross-entropy, and a tiny fp32 reference for its extras.

``LinearCETorch`` projects only the labelled rows, in tiles of at most ``block_elems`` fp32 logits: V blocks
outside (each weight block is read once per pass and its fp32 gradient accumulated in place), row chunks inside,
an online log-sum-exp across V blocks. The backward recomputes each tile from the saved per-row lse instead of
keeping anything [N, V]-sized, so peak extra memory is O(tile + N_labelled * H), whatever V is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_BLOCK_ELEMS = 1 << 20  # 1 Mi fp32 logits per tile = 4 MiB (a few tiles live at once)
_MAX_ROWS = 2048  # rows per tile: enough for GEMM efficiency, small enough for a wide V block


def check_ce_args(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """Shape / dtype / range checks with messages that name the argument."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: expected mean, sum or none")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}: expected 0 <= eps < 1")
    if z_loss < 0.0:
        raise ValueError(f"z_loss={z_loss}: expected >= 0")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"softcap={softcap}: expected None or > 0")
    kept = labels[labels != ignore_index]
    if kept.numel():
        lo, hi = int(kept.min()), int(kept.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise IndexError(f"labels span [{lo}, {hi}] (ignore_index={ignore_index}) but the vocabulary has "
                             f"{weight.shape[0]} rows")


def reference_linear_ce(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean", num_items=None,
                        label_smoothing=0.0, z_loss=0.0, softcap=None):
    """fp32 truth for the extras (materialises the labelled logits: tests only). With the extras off it is
    ``jrm_dist.losses.masked_lm_loss``."""
    keep = labels != ignore_index
    logits = hidden[keep].float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    per_tok = F.cross_entropy(logits, labels[keep], reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        per_tok = per_tok + z_loss * torch.logsumexp(logits, dim=-1) ** 2
    if reduction == "none":
        return torch.zeros(labels.shape, dtype=per_tok.dtype, device=per_tok.device).masked_scatter(keep, per_tok)
    total = per_tok.sum()
    if reduction == "sum":
        return total
    denom = num_items if num_items is not None else keep.sum()
    return total / torch.clamp(torch.as_tensor(denom, dtype=total.dtype, device=total.device), min=1)


def _tiles(n_rows: int, vocab: int, block_elems: int):
    """(rows per chunk, V block width) with rows * width <= block_elems."""
    rows = max(1, min(n_rows, _MAX_ROWS, block_elems // min(vocab, 256)))  # keep V blocks >= 256 wide
    width = max(1, min(vocab, block_elems // rows))
    return rows, width


def _logits(h, w_blk, b_blk, softcap):
    """fp32 logits tile (+ bias, soft-capped) and tanh for the soft-cap derivative."""
    x = h @ w_blk.t()
    if b_blk is not None:
        x += b_blk
    if softcap is None:
        return x, None
    t = torch.tanh(x / softcap)
    return t * softcap, t


class LinearCETorch(torch.autograd.Function):
    """Returns the per-row loss (reduction 'none', 0 at ignored rows) or its sum ('sum')."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, eps, zc, softcap, block_elems):
        rows = (labels != ignore_index).nonzero().squeeze(1)
        n, vocab = rows.numel(), weight.shape[0]
        h = hidden.detach()[rows].float()
        y = labels[rows].long()
        m_run = torch.full((n,), float("-inf"), device=h.device)
        s_run = torch.zeros(n, device=h.device)
        tgt = torch.zeros(n, device=h.device)
        sum_x = torch.zeros(n, device=h.device)
        rchunk, width = _tiles(n, vocab, block_elems)
        for v0 in range(0, vocab if n else 0, width):
            v1 = min(v0 + width, vocab)
            w_blk = weight.detach()[v0:v1].float()
            b_blk = None if bias is None else bias.detach()[v0:v1].float()
            for r0 in range(0, n, rchunk):
                r1 = min(r0 + rchunk, n)
                x, _ = _logits(h[r0:r1], w_blk, b_blk, softcap)
                new_m = torch.maximum(m_run[r0:r1], x.amax(dim=1))
                s_run[r0:r1] = s_run[r0:r1] * torch.exp(m_run[r0:r1] - new_m) + torch.exp(x - new_m[:, None]).sum(1)
                m_run[r0:r1] = new_m
                yy = y[r0:r1]
                hit = ((yy >= v0) & (yy < v1)).nonzero().squeeze(1)
                tgt[r0 + hit] = x[hit, yy[hit] - v0]
                if eps:
                    sum_x[r0:r1] += x.sum(1)
        lse = m_run + torch.log(s_run)
        loss = lse - (1.0 - eps) * tgt
        if eps:
            loss = loss - eps * sum_x / vocab
        if zc:
            loss = loss + zc * lse * lse
        ctx.save_for_backward(hidden, weight, bias, rows, y, lse)
        ctx.meta = (reduction, eps, zc, softcap, block_elems, labels.shape[0])
        if reduction == "none":
            out = torch.zeros(labels.shape[0], device=h.device)
            out[rows] = loss
            return out
        return loss.sum()

    @staticmethod
    def backward(ctx, g):
        hidden, weight, bias, rows, y, lse = ctx.saved_tensors
        reduction, eps, zc, softcap, block_elems, n_all = ctx.meta
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = rows.numel(), weight.shape[0]
        g = g.float()
        gr = g[rows] if reduction == "none" else g.expand(n)
        coef_p = (gr * (1.0 + 2.0 * zc * lse))[:, None]  # d/dx of lse terms: (1 + 2 zc lse) p
        coef_u = (gr * (eps / vocab))[:, None]  # smoothing: eps/V on every logit
        coef_y = gr * (1.0 - eps)  # target logit
        h = hidden.detach()[rows].float()
        dh = torch.zeros_like(h) if need_h else None
        # every dweight row is written below (first row chunk by mm(out=), later ones add): no zero-fill pass
        dw = (torch.empty_like(weight) if n else torch.zeros_like(weight)) if need_w else None
        db = torch.zeros(vocab, device=h.device) if need_b else None
        rchunk, width = _tiles(n, vocab, block_elems)
        for v0 in range(0, vocab if n else 0, width):
            v1 = min(v0 + width, vocab)
            w_blk = weight.detach()[v0:v1].float()
            b_blk = None if bias is None else bias.detach()[v0:v1].float()
            dw_blk = None
            if need_w:
                dw_blk = dw[v0:v1] if dw.dtype == torch.float32 else torch.empty_like(w_blk)
            for r0 in range(0, n, rchunk):
                r1 = min(r0 + rchunk, n)
                x, t = _logits(h[r0:r1], w_blk, b_blk, softcap)
                dx = torch.exp(x - lse[r0:r1, None]) * coef_p[r0:r1]
                if eps:
                    dx -= coef_u[r0:r1]
                yy = y[r0:r1]
                hit = ((yy >= v0) & (yy < v1)).nonzero().squeeze(1)
                dx[hit, yy[hit] - v0] -= coef_y[r0:r1][hit]
                if t is not None:
                    dx *= 1.0 - t * t
                if need_h:
                    dh[r0:r1].addmm_(dx, w_blk)
                if need_w and r0 == 0:
                    torch.mm(dx.t(), h[r0:r1], out=dw_blk)
                elif need_w:
                    dw_blk.addmm_(dx.t(), h[r0:r1])
                if need_b:
                    db[v0:v1] += dx.sum(0)
            if need_w and dw.dtype != torch.float32:
                dw[v0:v1] = dw_blk.to(dw.dtype)
        dhidden = None
        if need_h:
            dhidden = torch.zeros_like(hidden)
            dhidden[rows] = dh.to(hidden.dtype)
        dbias = db.to(bias.dtype) if need_b else None
        return dhidden, dw, dbias, None, None, None, None, None, None, None
