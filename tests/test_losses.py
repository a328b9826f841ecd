"""Reference losses: gradients, tails, tie models, quadrature vs Monte-Carlo, LM loss, schedules."""
import math

import pytest
import torch
import torch.nn.functional as F

from jrm_dist.losses import (RANK_MODES, alpha_at, gaussian_rank_loss, joint_loss, masked_lm_loss, mc_bt_loss,
                             ranking_to_pairs)

WIN = torch.tensor([0, 1, 2, 0, 3])
LOSE = torch.tensor([1, 2, 3, 3, 1])
TIE = torch.tensor([False, True, False, False, True])


@pytest.mark.parametrize("mode", RANK_MODES)
@pytest.mark.parametrize("ties", ["model", "ignore"])
def test_gradcheck_float64(mode, ties):
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    lv = (0.5 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_()

    def f(m, v):
        return gaussian_rank_loss(m, v, WIN, LOSE, TIE, mode=mode, ties=ties, reduction="none")

    assert torch.autograd.gradcheck(f, (mu, lv), eps=1e-6, atol=1e-6)


def test_thurstone_matches_closed_form():
    mu = torch.tensor([0.3, -0.4, 1.2], dtype=torch.float64)
    lv = torch.tensor([0.1, -0.5, 0.7], dtype=torch.float64)
    w, l = torch.tensor([0, 2]), torch.tensor([1, 0])
    got = gaussian_rank_loss(mu, lv, w, l, mode="thurstone", reduction="none")
    for k in range(2):
        z = (mu[w[k]] - mu[l[k]]) / math.sqrt(math.exp(lv[w[k]]) + math.exp(lv[l[k]]))
        assert got[k].item() == pytest.approx(-math.log(0.5 * math.erfc(-z / math.sqrt(2))), rel=1e-12)
    bt = gaussian_rank_loss(mu, lv, w, l, mode="bt", reduction="none")
    assert torch.allclose(bt, F.softplus(-(mu[w] - mu[l])))


@pytest.mark.parametrize("mode", ["thurstone", "bt"])
def test_tie_models_are_probabilities(mode):
    """P(i > j) + P(j > i) + P(tie) = 1 for Glenn–David (thurstone) and Rao–Kupper (bt). bt_expected
    averages Rao–Kupper log-likelihoods over z; its nodes are covered by the quadrature tests."""
    mu = torch.tensor([0.7, -0.2], dtype=torch.float64)
    lv = torch.tensor([-0.3, 0.4], dtype=torch.float64)
    i, j = torch.tensor([0]), torch.tensor([1])
    m = 0.6
    kw = dict(mode=mode, reduction="none", tie_margin=m)
    p_ij = torch.exp(-gaussian_rank_loss(mu, lv, i, j, torch.tensor([False]), **kw))
    p_ji = torch.exp(-gaussian_rank_loss(mu, lv, j, i, torch.tensor([False]), **kw))
    p_t = torch.exp(-gaussian_rank_loss(mu, lv, i, j, torch.tensor([True]), **kw))
    assert (p_ij + p_ji + p_t).item() == pytest.approx(1.0, abs=1e-12)
    assert p_t.item() > 0


def test_tie_never_counted_as_win():
    mu = torch.tensor([2.0, 0.0])
    lv = torch.zeros(2)
    w, l = torch.tensor([0]), torch.tensor([1])
    as_win = gaussian_rank_loss(mu, lv, w, l, torch.tensor([False]), reduction="none")
    as_tie = gaussian_rank_loss(mu, lv, w, l, torch.tensor([True]), reduction="none")
    assert as_tie.item() != pytest.approx(as_win.item())
    ignored = gaussian_rank_loss(mu, lv, w, l, torch.tensor([True]), ties="ignore", reduction="none")
    assert ignored.numel() == 0


@pytest.mark.parametrize("mode", RANK_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tails_finite(mode, dtype):
    """No NaN/Inf in loss or gradients for |dmu| up to 1e4 and log_var in [-30, 30]."""
    vals = [-1e4, -30.0, -1.0, 0.0, 1e-3, 1.0, 30.0, 1e4]
    lvs = [-30.0, -10.0, 0.0, 10.0, 30.0]
    mu = torch.tensor([v for v in vals for _ in lvs], dtype=dtype)
    lv = torch.tensor([x for _ in vals for x in lvs], dtype=dtype)
    n = mu.numel()
    w = torch.arange(n).repeat_interleave(n)
    l = torch.arange(n).repeat(n)
    keep = w != l
    w, l = w[keep], l[keep]
    tie = (torch.arange(w.numel()) % 3) == 0
    mu.requires_grad_(); lv.requires_grad_()
    loss = gaussian_rank_loss(mu, lv, w, l, tie, mode=mode, reduction="none")
    assert torch.isfinite(loss).all() and (loss >= -1e-6).all()
    loss.sum().backward()
    assert torch.isfinite(mu.grad).all()
    if mode != "bt":
        assert torch.isfinite(lv.grad).all()


def test_quadrature_agrees_with_monte_carlo():
    """bt_expected is the exact expectation the 1000-sample MC loss estimates: with many samples the MC
    mean converges to it (within 4 standard errors), and the 1000-sample estimate scatters around it."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    lv = torch.randn(6, generator=g, dtype=torch.float64)
    w, l = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([1, 2, 3, 4, 5])
    gh = gaussian_rank_loss(mu, lv, w, l, mode="bt_expected", ties="ignore").item()
    runs = torch.tensor([mc_bt_loss(mu, lv, w, l, 1000, g).item() for _ in range(400)])
    se = runs.std().item() / math.sqrt(len(runs))
    assert abs(runs.mean().item() - gh) < 4 * se + 1e-9
    assert runs.std().item() > 0  # MC(1000) is noisy; quadrature is not
    again = gaussian_rank_loss(mu, lv, w, l, mode="bt_expected", ties="ignore").item()
    assert again == gh


def test_bt_expected_reduces_to_bt_without_variance():
    mu = torch.tensor([0.5, -0.5, 2.0], dtype=torch.float64)
    lv = torch.full((3,), -30.0, dtype=torch.float64)
    w, l = torch.tensor([0, 2]), torch.tensor([1, 1])
    a = gaussian_rank_loss(mu, lv, w, l, mode="bt_expected", ties="ignore", reduction="none")
    b = gaussian_rank_loss(mu, lv, w, l, mode="bt", ties="ignore", reduction="none")
    assert torch.allclose(a, b, atol=1e-6)


def test_reductions():
    mu = torch.randn(4)
    lv = torch.randn(4)
    none = gaussian_rank_loss(mu, lv, WIN, LOSE, TIE, reduction="none")
    assert none.shape == (5,)
    assert torch.allclose(gaussian_rank_loss(mu, lv, WIN, LOSE, TIE, reduction="sum"), none.sum())
    assert torch.allclose(gaussian_rank_loss(mu, lv, WIN, LOSE, TIE), none.mean())
    with pytest.raises(ValueError, match="mode"):
        gaussian_rank_loss(mu, lv, WIN, LOSE, mode="plackett")


def test_masked_lm_loss_matches_full_logits():
    g = torch.Generator().manual_seed(0)
    N, H, V = 37, 16, 53
    h = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[::3] = -100
    ref = F.cross_entropy(h @ W.t() + b, y, ignore_index=-100)
    assert torch.allclose(masked_lm_loss(h, W, y, bias=b), ref, atol=1e-5)
    full_sum = F.cross_entropy(h @ W.t() + b, y, ignore_index=-100, reduction="sum")
    assert torch.allclose(masked_lm_loss(h, W, y, bias=b, reduction="sum"), full_sum, atol=1e-4)
    # num_items: the global labelled-token count (ranks x accumulation) divides the local sum
    assert torch.allclose(masked_lm_loss(h, W, y, bias=b, num_items=100), full_sum / 100, atol=1e-5)
    per = masked_lm_loss(h, W, y, bias=b, reduction="none")
    assert per.shape == (N,) and (per[::3] == 0).all()
    y_all = torch.full((N,), -100)
    assert masked_lm_loss(h, W, y_all).item() == 0.0


def test_joint_loss_and_alpha_schedules():
    r, lm = torch.tensor(2.0), torch.tensor(4.0)
    assert joint_loss(r, lm, 0.25).item() == pytest.approx(0.75 * 2 + 0.25 * 4)
    assert alpha_at(5, 0.3) == 0.3
    assert alpha_at(0, 0.4, "linear", 0.0, 10) == 0.0
    assert alpha_at(5, 0.4, "linear", 0.0, 10) == pytest.approx(0.2)
    assert alpha_at(10, 0.4, "linear", 0.0, 10) == pytest.approx(0.4)
    assert alpha_at(5, 0.4, "cosine", 0.0, 10) == pytest.approx(0.2)
    assert alpha_at(2, 0.4, "cosine", 0.0, 10) < alpha_at(2, 0.4, "linear", 0.0, 10)
    with pytest.raises(ValueError):
        alpha_at(1, 0.3, "exp")


def test_ranking_to_pairs_with_ties():
    win, lose, tie = ranking_to_pairs([[2], [0, 3], [1]])
    pairs = set(zip(win, lose, tie))
    assert pairs == {(2, 0, False), (2, 3, False), (2, 1, False), (0, 3, True), (0, 1, False), (3, 1, False)}
    # EditReward votes: leftvote, rightvote, tie
    assert ranking_to_pairs([[0], [1]]) == ([0], [1], [False])
    assert ranking_to_pairs([[1], [0]]) == ([1], [0], [False])
    assert ranking_to_pairs([[0, 1]]) == ([0], [1], [True])
