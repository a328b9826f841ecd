import pytest
import torch

from jrm_dist.metrics import effective_rank, pairwise_accuracy


def test_effective_rank_identity_is_d():
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0, rel=1e-9)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_effective_rank_rank_k(k):
    g = torch.Generator().manual_seed(k)
    q1, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    s = torch.zeros(40, 12, dtype=torch.float64)
    s[range(k), range(k)] = 3.0
    assert effective_rank(q1 @ s @ q2.T) == pytest.approx(k, rel=1e-6)


def test_effective_rank_known_spectrum():
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)
    p = s / s.sum()
    expected = float(torch.exp(-(p * p.log()).sum()))
    assert effective_rank(torch.diag(s)) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError):
        effective_rank(torch.zeros(0, 3))


def test_pairwise_accuracy_ties_wrong():
    mu = torch.tensor([1.0, 0.0, 0.0, 2.0])
    w = torch.tensor([0, 1, 3, 0])
    l = torch.tensor([1, 2, 0, 2])
    # pair 1: 0.0 vs 0.0 is a model tie -> wrong
    assert pairwise_accuracy(mu, w, l) == pytest.approx(3 / 4)
    assert pairwise_accuracy(mu, w, l, torch.tensor([False, True, False, False])) == pytest.approx(1.0)
