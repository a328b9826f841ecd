"""Metrics shared by training, evaluation and reports."""
from __future__ import annotations

import math

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


# ----------------------------------------------------------------------------- calibration of P(A beats B)
# Conventions: a "pair" is (A, B) with a human outcome y = 1 when A won, 0 when B won. Human ties have
# no winner, so P(win) says nothing testable about them: callers drop tie pairs before calling these
# functions (``calibration_metrics`` rejects any outcome other than 0 / 1).

def win_probability(mu_a, sigma_a, mu_b, sigma_b, mode: str = "thurstone", tie_margin: float = 0.0) -> torch.Tensor:
    """P(A beats B) under a rank mode of :mod:`jrm_dist.losses`, as float64 (inputs broadcast).

    * ``thurstone``   Phi(dmu / sqrt(s_a^2 + s_b^2))
    * ``bt_expected`` E[sigmoid(x)], x ~ N(dmu, s_a^2 + s_b^2), by the loss's Gauss–Hermite rule
    * ``bt``          sigmoid(dmu) (sigma unused)

    ``tie_margin`` m > 0: the model was trained with the three-outcome tie model (``loss.ties=model``);
    the result is then P(A beats B | the pair is decided) = P(win) / (P(win) + P(loss)), with P(win)
    and P(loss) the loss's Glenn–David / Rao–Kupper win probabilities. With m = 0 it is the plain formula.
    Computed as sigmoid(log P(win) - log P(loss)) with each log in a tail-safe form, so dmu up to 1e4
    and sigmas from 0 to e^15 give finite values, and P(A beats B) + P(B beats A) = 1.
    """
    from jrm_dist.losses import GH_W, GH_X, RANK_MODES

    if mode not in RANK_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {RANK_MODES}")
    if tie_margin < 0:
        raise ValueError(f"tie_margin={tie_margin}: must be >= 0")
    f64 = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    mu_a, sigma_a, mu_b, sigma_b = torch.broadcast_tensors(f64(mu_a), f64(sigma_a), f64(mu_b), f64(sigma_b))
    z = mu_a - mu_b
    m = float(tie_margin)
    if mode == "bt":
        log_w, log_l = torch.nn.functional.logsigmoid(z - m), torch.nn.functional.logsigmoid(-z - m)
    else:
        s = torch.sqrt(sigma_a * sigma_a + sigma_b * sigma_b).clamp(min=1e-150)  # s = 0: the deterministic limit
        if mode == "thurstone":
            log_w, log_l = torch.special.log_ndtr((z - m) / s), torch.special.log_ndtr((-z - m) / s)
        else:  # log E[sigmoid(+-x - m)] = logsumexp_k(log w_k + logsigmoid(+-x_k - m)), x_k = z + sqrt2 s t_k
            x = z.unsqueeze(-1) + math.sqrt(2.0) * s.unsqueeze(-1) * torch.tensor(GH_X, dtype=torch.float64)
            log_wk = torch.tensor(GH_W, dtype=torch.float64).log()
            log_w = torch.logsumexp(log_wk + torch.nn.functional.logsigmoid(x - m), -1)
            # the nodes are symmetric: flipping keeps P(A beats B) + P(B beats A) = 1 and z = 0 at 0.5 exactly
            log_l = torch.logsumexp(log_wk + torch.nn.functional.logsigmoid(-x - m).flip(-1), -1)
    return torch.sigmoid(log_w - log_l)


def _pairs(p_win, outcome) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(p_win, dtype=torch.float64).flatten()
    y = torch.as_tensor(outcome, dtype=torch.float64).flatten()
    if p.shape != y.shape:
        raise ValueError(f"p_win has {p.numel()} pairs but outcome has {y.numel()}")
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError("outcome must be 1 (A won) or 0 (B won); drop human-tie pairs before calibration")
    if bool(((p < 0) | (p > 1) | torch.isnan(p)).any()):
        raise ValueError("p_win must lie in [0, 1]")
    return p, y


def confidence_and_correct(p_win, outcome) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: confidence max(p, 1 - p) of the side the model favours, and whether that side won
    (1 / 0; 0.5 when p is exactly 0.5, its expected accuracy). Both are unchanged by swapping A and B."""
    p, y = _pairs(p_win, outcome)
    conf = torch.maximum(p, 1.0 - p)
    correct = torch.where(p == 0.5, torch.full_like(p, 0.5), ((p > 0.5) == (y == 1)).double())
    return conf, correct


def reliability_bins(p_win, outcome, n_bins: int = 10) -> list[dict]:
    """Equal-width confidence bins on [0.5, 1]: per bin its edges, pair count, mean confidence and accuracy
    (None for an empty bin). ECE and the reliability diagram are both read off these bins."""
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins}: must be >= 1")
    conf, correct = confidence_and_correct(p_win, outcome)
    idx = ((conf - 0.5) * 2 * n_bins).floor().long().clamp(0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        bins.append({"lo": 0.5 + 0.5 * b / n_bins, "hi": 0.5 + 0.5 * (b + 1) / n_bins, "count": n,
                     "confidence": float(conf[sel].mean()) if n else None,
                     "accuracy": float(correct[sel].mean()) if n else None})
    return bins


LOG_P_FLOOR = math.log(1e-15)  # per-pair log-likelihood floor: one certain mistake cannot make the mean -inf


def calibration_metrics(p_win, outcome, n_bins: int = 10) -> dict:
    """Calibration of P(A beats B) on decided pairs (``outcome`` 1: A won, 0: B won; ties dropped first).

    * ``log_likelihood``: mean log P(observed winner) (higher is better; 0 is perfect, log 0.5 a coin),
      each pair floored at log(1e-15).
    * ``brier``: mean (p - y)^2 (0 perfect, 0.25 for always 0.5).
    * ``ece``: expected calibration error: sum over equal-width confidence bins of (bin share) x
      |accuracy - mean confidence|, confidence = max(p, 1 - p), so the order of a pair does not matter.
    * ``sel_acc_25/50/100``: accuracy on the 25 / 50 / 100 % most confident pairs (ceil of the share;
      confidence ties keep input order). P exactly 0.5 counts as wrong here, as equal scores do in
      pairwise accuracy, so ``sel_acc_100`` is the pairwise accuracy.
    * ``n``: decided pairs. With n = 0 every metric is NaN.
    """
    p, y = _pairs(p_win, outcome)
    n = p.numel()
    if n == 0:
        nan = float("nan")
        return {"log_likelihood": nan, "brier": nan, "ece": nan, "sel_acc_25": nan, "sel_acc_50": nan,
                "sel_acc_100": nan, "n": 0}
    with torch.no_grad():
        log_p = torch.where(y == 1, torch.log(p), torch.log1p(-p)).clamp(min=LOG_P_FLOOR)
        bins = reliability_bins(p, y, n_bins)
        ece = sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
        conf = torch.maximum(p, 1.0 - p)
        strict = (((p > 0.5) & (y == 1)) | ((p < 0.5) & (y == 0))).double()
        order = torch.sort(conf, descending=True, stable=True).indices
        sel = {}
        for share in (25, 50, 100):
            k = max(1, math.ceil(n * share / 100))
            sel[f"sel_acc_{share}"] = float(strict[order[:k]].mean())
        return {"log_likelihood": float(log_p.mean()), "brier": float(((p - y) ** 2).mean()), "ece": float(ece),
                **sel, "n": n}


def reliability_diagram(p_win, outcome, path, title: str = "Reliability of P(A beats B)", n_bins: int = 10):
    """PNG: accuracy per confidence bin against the diagonal (perfect calibration), with the pair count
    per bin below. Bars under the diagonal: over-confident there; above: under-confident."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    bins = reliability_bins(p_win, outcome, n_bins)
    m = calibration_metrics(p_win, outcome, n_bins)
    width = 0.5 / n_bins
    mids = [0.5 * (b["lo"] + b["hi"]) for b in bins]
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5, 5), dpi=100, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0.5, 1.0], [0.5, 1.0], "--", color="grey", lw=1, label="perfect calibration")
    full = [(x, b) for x, b in zip(mids, bins) if b["count"]]
    ax.bar([x for x, _ in full], [b["accuracy"] for _, b in full], width=width * 0.9, color="tab:blue",
           edgecolor="black", lw=0.5, label="accuracy in bin")
    ax.plot([b["confidence"] for _, b in full], [b["accuracy"] for _, b in full], "o", color="tab:red", ms=3,
            label="(mean confidence, accuracy)")
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nn={m['n']}  ECE={m['ece']:.3f}  Brier={m['brier']:.3f}  LL={m['log_likelihood']:.3f}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    axc.bar(mids, [b["count"] for b in bins], width=width * 0.9, color="tab:grey")
    axc.set_xlabel("confidence max(P, 1 - P)")
    axc.set_ylabel("pairs")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def rank_settings(loss: dict | None) -> tuple[str, float]:
    """(rank mode, tie margin) for :func:`win_probability` from the loss settings a checkpoint records
    (``jrm_config.json`` → ``loss``: rank_mode, ties, tie_margin). The margin applies only when ties were
    modelled (``ties=model``); a checkpoint that records nothing is read as thurstone without a margin."""
    loss = loss or {}
    mode = loss.get("rank_mode") or "thurstone"
    margin = float(loss.get("tie_margin") or 0.0) if loss.get("ties", "model") == "model" else 0.0
    return mode, margin
