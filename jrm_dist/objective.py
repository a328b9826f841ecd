"""The JRM objective: model outputs + batch → L = (1 - alpha) L_rank + alpha L_LM, and its parts.

One place for the joint loss, used by the trainer, the benches and the tests. ``lm_items`` is the
number of labelled tokens of the whole optimizer step (all ranks, all accumulation steps) so the LM
mean is the same whatever the data-parallel / accumulation split.
"""
from __future__ import annotations

from typing import Any

import torch

from jrm_dist.config import LossConfig
from jrm_dist.losses import alpha_at, gaussian_rank_loss, joint_loss
from jrm_dist.metrics import pairwise_accuracy


def rank_loss_fn(impl: str = "auto"):
    """The fused rank loss of jrm_kernels when available, else the torch reference."""
    if impl == "auto":
        try:
            import jrm_kernels

            return jrm_kernels.gaussian_rank_loss
        except (ImportError, AttributeError):
            pass
    return gaussian_rank_loss


def joint_objective(out: dict[str, torch.Tensor], batch: dict[str, Any], cfg: LossConfig, step: int,
                    lm_items: float | torch.Tensor | None = None, rank_items: float | torch.Tensor | None = None,
                    impl: str = "auto") -> dict[str, torch.Tensor]:
    """Return total loss (for backward) and detached parts for logging.

    ``rank_items`` / ``lm_items``: the global pair / token counts of the optimizer step (defaults: local),
    so that sums over ranks and micro-batches reproduce the one-big-batch means.
    """
    alpha = alpha_at(step, cfg.alpha, cfg.alpha_schedule, cfg.alpha_start, cfg.alpha_ramp_steps)
    tie = batch["tie"] if batch["tie"].numel() else None
    rank_fn = rank_loss_fn(impl)
    n_pairs = batch["win_idx"].numel()
    if n_pairs:
        rank_sum = rank_fn(out["mu"], out["log_var"], batch["win_idx"], batch["lose_idx"], tie,
                           mode=cfg.rank_mode, reduction="sum", ties=cfg.ties, tie_margin=cfg.tie_margin)
    else:
        rank_sum = out["mu"].sum() * 0.0
    if cfg.ties == "ignore" and tie is not None:
        n_pairs = int((~tie).sum())
    rank_den = torch.as_tensor(rank_items if rank_items is not None else max(n_pairs, 1), dtype=torch.float32)
    lm_den = torch.as_tensor(lm_items if lm_items is not None else out["lm_tokens"], dtype=torch.float32)
    rank = rank_sum / rank_den.clamp(min=1).to(rank_sum.device)
    lm = out["lm_loss_sum"].float() / lm_den.clamp(min=1).to(rank_sum.device)
    total = joint_loss(rank, lm, alpha)
    with torch.no_grad():
        acc = pairwise_accuracy(out["mu"].detach(), batch["win_idx"], batch["lose_idx"], tie)
        sigma = torch.exp(0.5 * out["log_var"].detach().float())
    return {"loss": total, "rank": rank.detach(), "lm": lm.detach(), "alpha": torch.tensor(alpha),
            "accuracy": torch.tensor(acc), "mu_mean": out["mu"].detach().float().mean(),
            "mu_std": out["mu"].detach().float().std() if out["mu"].numel() > 1 else torch.tensor(0.0),
            "sigma_mean": sigma.mean(), "pairs": torch.tensor(float(n_pairs)),
            "lm_tokens": out["lm_tokens"].detach().float()}


def drop_lm(batch: dict[str, Any], cfg: LossConfig, step: int) -> dict[str, Any]:
    """The batch the model sees at ``step``: labels removed when alpha is 0 there (the model then skips
    the LM head; an alpha of 0 times an LM loss would still pay its forward, backward and optimizer)."""
    if batch.get("labels") is not None and not lm_active(cfg, step):
        return {**batch, "labels": None}
    return batch


def local_items(batch: dict[str, Any], cfg: LossConfig) -> tuple[int, int]:
    """(rank pairs, labelled LM tokens) of one micro-batch, counted as joint_objective counts them.
    The trainer all-reduces their sum over ranks and accumulation steps to get the step's divisors.
    Also right for a group-packed batch: it keeps each candidate's labels at its own tokens and starts every
    candidate on an unlabelled token, so the shifted count is the same (jrm_dist.data.packing)."""
    n_pairs = batch["win_idx"].numel()
    if cfg.ties == "ignore" and batch["tie"].numel():
        n_pairs = int((~batch["tie"]).sum())
    labels = batch.get("labels")
    n_tokens = 0 if labels is None else int((labels[:, 1:] != -100).sum())
    return n_pairs, n_tokens


def lm_active(cfg: LossConfig, step: int) -> bool:
    """Whether step ``step`` needs the LM loss (alpha > 0). A pure function of the step, so every
    ZeRO-3 rank makes the same choice and runs the same collectives."""
    return alpha_at(step, cfg.alpha, cfg.alpha_schedule, cfg.alpha_start, cfg.alpha_ramp_steps) > 0


def rank_only(cfg: LossConfig) -> bool:
    """alpha is 0 at every step: no rationale is encoded, the LM head is frozen and never called."""
    if cfg.alpha != 0:
        return False
    return cfg.alpha_schedule == "constant" or cfg.alpha_ramp_steps <= 0 or cfg.alpha_start == 0
