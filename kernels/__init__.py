"""jrm_kernels: fused losses for JRM (installed from ``kernels/`` under the import name ``jrm_kernels``).

Dispatch (``backend="auto"``):
* CUDA tensors                    -> Triton kernels, compiled;
* CPU tensors, ``TRITON_INTERPRET=1`` -> the same Triton kernels under the Triton interpreter (slow: tests);
* CPU tensors otherwise           -> PyTorch implementations with the same math and bounded memory.

Triton is imported lazily, on the first Triton call, because it reads ``TRITON_INTERPRET`` when a kernel is
decorated: importing jrm_kernels never fixes the mode, and a later mismatch (the variable changed after the
kernels were built) raises a clear error instead of silently running the wrong backend.
"""
from __future__ import annotations

import os

import torch

from ._rules import check_rank_options, resolve_ties

from ._ce_torch import DEFAULT_BLOCK_ELEMS, LinearCETorch, check_ce_args, reference_linear_ce
from ._rank_torch import RankLossTorch

__all__ = ["gaussian_rank_loss", "fused_linear_masked_ce", "reference_linear_ce", "pick_backend"]

BACKENDS = ("auto", "triton", "torch")
_TRITON_MODE: dict = {}


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def pick_backend(device: torch.device, backend: str = "auto") -> str:
    """'triton' on CUDA or under TRITON_INTERPRET=1, else 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        if backend == "triton" and device.type != "cuda" and not _interpret_env():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before the first "
                               "Triton call (the interpreter); use backend='torch' or 'auto' instead")
        return backend
    return "triton" if device.type == "cuda" or _interpret_env() else "torch"


def _triton_module(name: str):
    """Import a Triton kernel module, checking the interpret mode it was built with still holds."""
    import importlib

    mod = importlib.import_module(f"{__name__}.{name}")
    want = _interpret_env()
    built = _TRITON_MODE.setdefault("interpret", want)
    if built != want:
        raise RuntimeError(
            f"jrm_kernels: Triton kernels were built with TRITON_INTERPRET={int(built)} but it is now "
            f"{int(want)}; Triton reads it when kernels are defined, so set it before the first kernel call "
            "(e.g. in a fresh process)")
    return mod


def _check_rank_args(mu, log_var, win_idx, lose_idx, tie, mode, reduction, ties, tie_margin):
    check_rank_options(mode, ties, reduction)
    if mu.dim() != 1 or log_var.shape != mu.shape:
        raise ValueError(f"mu and log_var must be 1-D of the same length, got {tuple(mu.shape)} and "
                         f"{tuple(log_var.shape)}")
    if not mu.is_floating_point() or not log_var.is_floating_point():
        raise TypeError(f"mu / log_var must be floating point, got {mu.dtype} / {log_var.dtype}")
    if win_idx.dim() != 1 or lose_idx.shape != win_idx.shape:
        raise ValueError(f"win_idx and lose_idx must be 1-D of the same length, got {tuple(win_idx.shape)} and "
                         f"{tuple(lose_idx.shape)}")
    if win_idx.dtype not in (torch.int64, torch.int32) or lose_idx.dtype != win_idx.dtype:
        raise TypeError(f"win_idx / lose_idx must be int64 or int32, got {win_idx.dtype} / {lose_idx.dtype}")
    if tie is not None and (tie.shape != win_idx.shape or tie.dtype != torch.bool):
        raise ValueError(f"tie must be a bool mask over pairs of shape {tuple(win_idx.shape)}, got "
                         f"{tuple(tie.shape)} {tie.dtype}")
    if win_idx.numel():
        lo = int(torch.minimum(win_idx.min(), lose_idx.min()))
        hi = int(torch.maximum(win_idx.max(), lose_idx.max()))
        if lo < 0 or hi >= mu.numel():
            raise IndexError(f"pair indices span [{lo}, {hi}] but there are {mu.numel()} candidates")


def gaussian_rank_loss(mu: torch.Tensor, log_var: torch.Tensor, win_idx: torch.Tensor, lose_idx: torch.Tensor,
                       tie: torch.Tensor | None = None, mode: str = "thurstone", reduction: str = "mean",
                       ties: str = "model", tie_margin: float = 0.5, backend: str = "auto") -> torch.Tensor:
    """Fused uncertainty-aware pairwise ranking loss; same signature and math as
    ``jrm_dist.losses.gaussian_rank_loss`` (the fp32 truth), plus ``backend``."""
    _check_rank_args(mu, log_var, win_idx, lose_idx, tie, mode, reduction, ties, tie_margin)
    win_idx, lose_idx, tie, m = resolve_ties(win_idx, lose_idx, tie, ties, tie_margin)  # same rule as the reference
    if tie is not None and not bool(tie.any()):
        tie = None  # same margin, no tie rows: skip the tie branch
    if pick_backend(mu.device, backend) == "triton":
        fn = _triton_module("gaussian_rank").RankLossTriton
    else:
        fn = RankLossTorch
    return fn.apply(mu, log_var, win_idx, lose_idx, tie, mode, m, reduction)


def fused_linear_masked_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                           num_items: int | float | torch.Tensor | None = None, label_smoothing: float = 0.0,
                           z_loss: float = 0.0, softcap: float | None = None, backend: str = "auto",
                           block_elems: int = DEFAULT_BLOCK_ELEMS) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` at rows whose label != ignore_index, without ever
    holding the [N, V] logits (fp32 math; dweight accumulated in fp32).

    hidden [N, H], weight [V, H], labels [N]. Defaults match ``jrm_dist.losses.masked_lm_loss``.
    ``reduction``: mean (over ``num_items`` when given — the labelled-token count across ranks and accumulation
    steps — else the local count), sum, or none (per row, 0 at ignored rows). Extras (off by default):
    ``label_smoothing`` eps as in ``F.cross_entropy``, ``z_loss`` coefficient on lse^2 (PaLM), ``softcap`` c
    (logits -> c * tanh(logits / c), Gemma 2). ``block_elems`` bounds the fp32 logits tile of the CPU path.
    """
    check_ce_args(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss, softcap)
    red = "none" if reduction == "none" else "sum"  # the Functions return a sum; the mean is divided here
    if pick_backend(hidden.device, backend) == "triton":
        fn = _triton_module("fused_lm_ce").LinearCETriton
        out = fn.apply(hidden, weight, bias, labels, ignore_index, red, float(label_smoothing), float(z_loss),
                       softcap)
    else:
        out = LinearCETorch.apply(hidden, weight, bias, labels, ignore_index, red, float(label_smoothing),
                                  float(z_loss), softcap, int(block_elems))
    if reduction == "mean":
        if num_items is None:
            denom = (labels != ignore_index).sum()
        else:
            denom = num_items
        out = out / torch.clamp(torch.as_tensor(denom, dtype=out.dtype, device=out.device), min=1)
    return out
