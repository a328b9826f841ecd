"""Metrics shared by training, evaluation and reports."""
from __future__ import annotations

import torch


def singular_values(features: torch.Tensor, center: bool = False) -> torch.Tensor:
    x = features.detach().double()
    if center:
        x = x - x.mean(0, keepdim=True)
    return torch.linalg.svdvals(x)


def effective_rank(features: torch.Tensor, center: bool = False, eps: float = 1e-12) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of the normalised singular values of an
    ``[n, d]`` feature matrix. Identity → d; k equal non-zero singular values → k."""
    if features.ndim != 2 or min(features.shape) == 0:
        raise ValueError(f"effective_rank needs a non-empty [n, d] matrix, got shape {tuple(features.shape)}")
    s = singular_values(features, center)
    total = s.sum()
    if total <= eps:
        return 0.0
    p = s / total
    p = p[p > eps]
    return float(torch.exp(-(p * p.log()).sum()))


def pairwise_accuracy(mu: torch.Tensor, win_idx: torch.Tensor, lose_idx: torch.Tensor,
                      tie: torch.Tensor | None = None) -> float:
    """Fraction of decided (non-tie) human pairs where the winner scores strictly higher.
    A model tie (equal scores) counts as wrong; human-tie pairs are left out."""
    keep = torch.ones_like(win_idx, dtype=torch.bool) if tie is None else ~tie
    if int(keep.sum()) == 0:
        return float("nan")
    correct = (mu[win_idx[keep]] > mu[lose_idx[keep]]).float()
    return float(correct.mean())
