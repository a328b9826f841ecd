"""Calibration of P(A beats B): win_probability against Monte Carlo per rank mode, and the calibration
metrics on scores whose calibration is known by construction (outcomes sampled from the stated
probabilities), with tolerances derived from the sampling error of the bins, not picked by hand."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from jrm_dist.losses import RANK_MODES
from jrm_dist.metrics import (calibration_metrics, confidence_and_correct, reliability_bins, reliability_diagram,
                              win_probability)

N_SIGMA = 4.0  # every tolerance below is this many standard errors of the quantity being checked


def sampled(p: torch.Tensor, seed: int) -> torch.Tensor:
    """Outcomes drawn from the stated probabilities: a perfectly calibrated predictor by construction."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(p.shape, generator=g, dtype=torch.float64) < p).double()


def stated(n: int, seed: int) -> torch.Tensor:
    """P(A beats B) spread over (0, 1), including very confident pairs."""
    g = torch.Generator().manual_seed(seed)
    return torch.sigmoid(3.0 * torch.randn(n, generator=g, dtype=torch.float64))


def ece_tolerance(p: torch.Tensor, n_bins: int = 10) -> float:
    """N_SIGMA standard errors of each bin's accuracy under perfect calibration, weighted as ECE weights the
    bins: sd(bin accuracy) = sqrt(sum_i c_i (1 - c_i)) / n_b for the pairs' confidences c_i."""
    conf, _ = confidence_and_correct(p, torch.ones_like(p))
    idx = ((conf - 0.5) * 2 * n_bins).floor().long().clamp(0, n_bins - 1)
    tol = 0.0
    for b in range(n_bins):
        c = conf[idx == b]
        if c.numel():
            tol += c.numel() / p.numel() * N_SIGMA * math.sqrt(float((c * (1 - c)).sum())) / c.numel()
    return tol


# ------------------------------------------------------------------ calibration metrics
def test_calibrated_scores_have_ece_near_zero_and_the_expected_log_likelihood():
    p = stated(20_000, 0)
    y = sampled(p, 1)
    m = calibration_metrics(p, y)
    tol = ece_tolerance(p)
    assert 0 < tol < 0.05  # the bound is informative: an overconfident model lands far above it (next test)
    assert m["ece"] < tol
    assert m["n"] == 20_000
    # E[log-likelihood] = mean over pairs of p log p + (1 - p) log(1 - p) (minus the entropy)
    expect = float((p * p.log() + (1 - p) * torch.log1p(-p)).mean())
    var = float((p * (1 - p) * (p.log() - torch.log1p(-p)) ** 2).sum()) / p.numel() ** 2
    assert m["log_likelihood"] == pytest.approx(expect, abs=N_SIGMA * math.sqrt(var))
    # Brier expectation: mean p (1 - p)
    b_var = float((p * (1 - p) * (1 - 2 * p) ** 2).sum()) / p.numel() ** 2
    assert m["brier"] == pytest.approx(float((p * (1 - p)).mean()), abs=N_SIGMA * math.sqrt(b_var) + 1e-12)


def test_overconfident_scores_have_large_ece_and_worse_log_likelihood():
    p = stated(20_000, 2)
    y = sampled(p, 3)
    sharp = torch.sigmoid(4.0 * torch.logit(p))  # the same ranking, probabilities pushed to 0 / 1
    cal, over = calibration_metrics(p, y), calibration_metrics(sharp, y)
    assert over["ece"] > 0.1 > 5 * ece_tolerance(sharp)
    assert over["log_likelihood"] < cal["log_likelihood"] - 0.1
    assert over["brier"] > cal["brier"]
    # sharpening does not change the order of confidence nor which side is favoured
    for k in ("sel_acc_25", "sel_acc_50", "sel_acc_100"):
        assert over[k] == cal[k]
    # an underconfident model (probabilities pulled to 0.5) is miscalibrated too, bars above the diagonal
    soft = torch.sigmoid(0.25 * torch.logit(p))
    bins = [b for b in reliability_bins(soft, y) if b["count"] > 100]
    assert calibration_metrics(soft, y)["ece"] > 0.1
    assert all(b["accuracy"] > b["confidence"] for b in bins)


def test_perfect_and_worst_predictions():
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    m = calibration_metrics(y, y)
    assert m["brier"] == 0.0 and m["ece"] == 0.0 and m["log_likelihood"] == 0.0 and m["sel_acc_100"] == 1.0
    w = calibration_metrics(1 - y, y)
    assert w["brier"] == 1.0 and w["ece"] == 1.0 and w["sel_acc_100"] == 0.0
    assert w["log_likelihood"] == pytest.approx(math.log(1e-15))  # floored, not -inf
    coin = calibration_metrics(torch.full((4,), 0.5), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert coin["brier"] == 0.25 and coin["log_likelihood"] == pytest.approx(math.log(0.5))
    assert coin["ece"] == 0.0  # confidence 0.5, half right: calibrated
    assert coin["sel_acc_100"] == 0.0  # but P = 0.5 picks no side: wrong, as equal scores in pairwise accuracy


def test_selective_accuracy_on_a_constructed_example():
    # confidence order: pairs 0..7 (most to least confident); the confident half is all right, then 2 of 4
    p = torch.tensor([0.99, 0.02, 0.95, 0.1, 0.7, 0.35, 0.6, 0.45])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    m = calibration_metrics(p, y)
    assert m["sel_acc_25"] == 1.0 and m["sel_acc_50"] == 1.0 and m["sel_acc_100"] == pytest.approx(6 / 8)
    assert m["sel_acc_25"] >= m["sel_acc_50"] >= m["sel_acc_100"]
    # shares round up: 3 pairs -> top 25 % is 1 pair, top 50 % is 2
    m3 = calibration_metrics(torch.tensor([0.9, 0.8, 0.6]), torch.tensor([1.0, 0.0, 1.0]))
    assert (m3["sel_acc_25"], m3["sel_acc_50"], m3["sel_acc_100"]) == (1.0, 0.5, pytest.approx(2 / 3))


def test_metrics_do_not_depend_on_the_order_of_a_pair():
    p = stated(500, 4)
    y = sampled(p, 5)
    a, b = calibration_metrics(p, y), calibration_metrics(1 - p, 1 - y)
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-12), k


def test_bad_input_is_rejected_and_empty_is_nan():
    with pytest.raises(ValueError, match="drop human-tie pairs"):
        calibration_metrics(torch.tensor([0.6, 0.4]), torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="2 pairs but outcome has 3"):
        calibration_metrics(torch.tensor([0.6, 0.4]), torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_metrics(torch.tensor([1.2]), torch.tensor([1.0]))
    m = calibration_metrics(torch.zeros(0), torch.zeros(0))
    assert m["n"] == 0 and math.isnan(m["ece"]) and math.isnan(m["log_likelihood"])
    assert set(m) == {"log_likelihood", "brier", "ece", "sel_acc_25", "sel_acc_50", "sel_acc_100", "n"}


def test_reliability_diagram_png(tmp_path):
    p = stated(2000, 6)
    out = reliability_diagram(p, sampled(p, 7), tmp_path / "sub" / "rel.png", title="test")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 400
    bins = reliability_bins(p, sampled(p, 7))
    assert sum(b["count"] for b in bins) == 2000 and bins[0]["lo"] == 0.5 and bins[-1]["hi"] == 1.0


# ------------------------------------------------------------------ win probability
CASES = [(0.3, 0.5, -0.2, 1.0), (2.0, 1.5, 0.0, 1.0), (1.0, 0.1, 1.5, 0.2), (-0.4, 0.8, 0.1, 0.3)]


@pytest.mark.parametrize("mode", RANK_MODES)
def test_win_probability_matches_monte_carlo(mode):
    n = 400_000
    g = torch.Generator().manual_seed(11)
    for mu_a, s_a, mu_b, s_b in CASES:
        a = mu_a + s_a * torch.randn(n, generator=g, dtype=torch.float64)
        b = mu_b + s_b * torch.randn(n, generator=g, dtype=torch.float64)
        if mode == "thurstone":  # P(r_a > r_b) for r ~ N(mu, sigma^2)
            draws = (a > b).double()
        elif mode == "bt_expected":  # E[sigmoid(r_a - r_b)], the 1000-sample estimate of EditReward/HPSv3
            draws = torch.sigmoid(a - b)
        else:  # sigma unused
            draws = torch.sigmoid(torch.full((n,), mu_a - mu_b, dtype=torch.float64))
        se = float(draws.std()) / math.sqrt(n)
        got = float(win_probability(mu_a, s_a, mu_b, s_b, mode))
        assert got == pytest.approx(float(draws.mean()), abs=N_SIGMA * se + 1e-9), (mode, mu_a, s_a, mu_b, s_b)


@pytest.mark.parametrize("mode", RANK_MODES)
def test_win_probability_symmetric_batched_and_safe_at_extremes(mode):
    g = torch.Generator().manual_seed(12)
    mu_a, mu_b = 3 * torch.randn(200, generator=g), 3 * torch.randn(200, generator=g)
    s_a, s_b = torch.exp(torch.randn(200, generator=g)), torch.exp(torch.randn(200, generator=g))
    p_ab, p_ba = win_probability(mu_a, s_a, mu_b, s_b, mode), win_probability(mu_b, s_b, mu_a, s_a, mode)
    assert torch.allclose(p_ab + p_ba, torch.ones_like(p_ab), atol=1e-12)
    assert bool(((p_ab > 0.5) == (mu_a > mu_b)).all())  # the favoured side is the one with the higher mean
    for m in (0.0, 0.5):
        t_ab, t_ba = (win_probability(mu_a, s_a, mu_b, s_b, mode, m), win_probability(mu_b, s_b, mu_a, s_a, mode, m))
        assert torch.allclose(t_ab + t_ba, torch.ones_like(t_ab), atol=1e-12)
    # |dmu| up to 1e4, sigma from 0 (deterministic) to e^15 (log-variance 30), with and without a tie margin
    big = torch.tensor([1e4, -1e4, 0.0, 1.0, 1e4, 0.0])
    sig = torch.tensor([0.0, math.exp(-15), 0.0, math.exp(15), math.exp(15), 1.0])
    for m in (0.0, 0.5):
        p = win_probability(big, sig, 0.0, sig, mode, m)
        assert torch.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
        assert float(p[0]) == 1.0 and float(p[1]) == 0.0 and float(p[2]) == 0.5 and float(p[5]) == 0.5
    with pytest.raises(ValueError, match="mode="):
        win_probability(0.0, 1.0, 0.0, 1.0, "probit")


def test_win_probability_closed_forms_and_tie_margin():
    # thurstone: Phi(dmu / sqrt(s_a^2 + s_b^2)); sqrt(0.6^2 + 0.8^2) = 1, so Phi(1)
    phi_1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert float(win_probability(1.0, 0.6, 0.0, 0.8)) == pytest.approx(phi_1, abs=1e-15)
    assert float(win_probability(1.0, 5.0, 0.0, 7.0, "bt")) == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-15)
    # bt_expected with sigma 0 is bt; with a large sigma it is pulled towards 0.5
    assert float(win_probability(1.0, 0.0, 0.0, 0.0, "bt_expected")) == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-12)
    assert 0.5 < float(win_probability(1.0, 1.0, 0.0, 1.0, "bt_expected")) < 1 / (1 + math.exp(-1))
    # tie model (Glenn–David): P(A beats B | decided) = Phi((z - m)/s) / (Phi((z - m)/s) + Phi((-z - m)/s))
    z, m, s = 0.7, 0.5, math.sqrt(0.5)
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    want = Phi((z - m) / s) / (Phi((z - m) / s) + Phi((-z - m) / s))
    assert float(win_probability(z, 0.5, 0.0, 0.5, "thurstone", m)) == pytest.approx(want, abs=1e-14)
    # Rao–Kupper: sigmoid(z - m) / (sigmoid(z - m) + sigmoid(-z - m))
    sg = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert float(win_probability(z, 1.0, 0.0, 1.0, "bt", m)) == pytest.approx(sg(z - m) / (sg(z - m) + sg(-z - m)),
                                                                               abs=1e-14)


def test_bt_expected_with_tie_margin_matches_monte_carlo():
    """P(A beats B | decided) = E[sigmoid(x - m)] / (E[sigmoid(x - m)] + E[sigmoid(-x - m)]), x ~ N(dmu, v)."""
    n, m = 400_000, 0.5
    g = torch.Generator().manual_seed(13)
    for mu_a, s_a, mu_b, s_b in CASES:
        x = (mu_a - mu_b) + math.hypot(s_a, s_b) * torch.randn(n, generator=g, dtype=torch.float64)
        w, l = torch.sigmoid(x - m).mean(), torch.sigmoid(-x - m).mean()
        se = float(torch.sigmoid(x - m).std() + torch.sigmoid(-x - m).std()) / math.sqrt(n) / float(w + l)
        got = float(win_probability(mu_a, s_a, mu_b, s_b, "bt_expected", m))
        assert got == pytest.approx(float(w / (w + l)), abs=N_SIGMA * se), (mu_a, s_a, mu_b, s_b)


def test_rank_settings_from_a_checkpoint_loss_record():
    from jrm_dist.metrics import rank_settings

    assert rank_settings(None) == ("thurstone", 0.0)
    assert rank_settings({"rank_mode": "bt", "ties": "model", "tie_margin": 0.5}) == ("bt", 0.5)
    assert rank_settings({"rank_mode": "bt_expected", "ties": "ignore", "tie_margin": 0.5}) == ("bt_expected", 0.0)
