"""jrm_kernels.gaussian_rank_loss, CPU path: against the fp32 reference (jrm_dist.losses) and, for the
extreme tails, against 50-digit mpmath evaluations of the same models. The Triton kernel runs the same cases
under the interpreter in test_kernels_interpret.py."""
import itertools
import math

import mpmath
import pytest
import torch

import jrm_kernels
from jrm_dist.losses import GH_W, GH_X, gaussian_rank_loss as ref_loss


def loss_and_grads(fn, mu, log_var, *args, **kw):
    mu = mu.detach().clone().requires_grad_(True)
    log_var = log_var.detach().clone().requires_grad_(True)
    out = fn(mu, log_var, *args, **kw)
    out.sum().backward()
    z = torch.zeros_like
    return out.detach(), (mu.grad if mu.grad is not None else z(mu)), (log_var.grad if log_var.grad is not None
                                                                         else z(log_var))


def random_pairs(k, p, seed, tie_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    win = torch.randint(0, k, (p,), generator=g)
    lose = (win + torch.randint(1, k, (p,), generator=g)) % k
    tie = torch.rand(p, generator=g) < tie_frac
    mu = torch.randn(k, generator=g) * 2
    lv = torch.randn(k, generator=g) * 1.5
    return mu, lv, win, lose, tie


@pytest.mark.parametrize("mode", ["thurstone", "bt_expected", "bt"])
@pytest.mark.parametrize("ties", ["model", "ignore"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("k,p", [(2, 1), (7, 40), (33, 129)])
def test_matches_reference(mode, ties, reduction, k, p):
    mu, lv, win, lose, tie = random_pairs(k, p, seed=k * 1000 + p)
    kw = dict(mode=mode, reduction=reduction, ties=ties, tie_margin=0.7)
    want = loss_and_grads(ref_loss, mu, lv, win, lose, tie, **kw)
    got = loss_and_grads(jrm_kernels.gaussian_rank_loss, mu, lv, win, lose, tie, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-6)


def test_no_tie_mask_and_all_ties_ignored():
    mu, lv, win, lose, _ = random_pairs(5, 12, seed=3)
    for mode in ("thurstone", "bt_expected", "bt"):
        want = loss_and_grads(ref_loss, mu, lv, win, lose, None, mode=mode)
        got = loss_and_grads(jrm_kernels.gaussian_rank_loss, mu, lv, win, lose, None, mode=mode)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-6)
        # every pair a tie and ties ignored: nothing left, loss 0 with zero (finite) gradients
        all_tie = torch.ones_like(win, dtype=torch.bool)
        out, gmu, glv = loss_and_grads(jrm_kernels.gaussian_rank_loss, mu, lv, win, lose, all_tie, mode=mode,
                                       ties="ignore")
        assert out.item() == 0.0 and not gmu.any() and not glv.any()


def test_repeated_candidates_accumulate():
    """A candidate in many pairs receives the sum of its pairs' gradients (the kernel's atomics)."""
    mu = torch.tensor([0.3, -0.2, 1.0])
    lv = torch.tensor([0.1, -0.5, 0.4])
    win = torch.tensor([0, 0, 0, 2, 0, 2, 1])
    lose = torch.tensor([1, 1, 1, 1, 2, 0, 0])
    tie = torch.tensor([False, False, True, False, False, True, False])
    for mode in ("thurstone", "bt_expected", "bt"):
        _, gmu, glv = loss_and_grads(jrm_kernels.gaussian_rank_loss, mu, lv, win, lose, tie, mode=mode,
                                     reduction="sum")
        # the same sum, one pair at a time
        smu, slv = torch.zeros(3), torch.zeros(3)
        for i in range(win.numel()):
            _, a, b = loss_and_grads(jrm_kernels.gaussian_rank_loss, mu, lv, win[i:i + 1], lose[i:i + 1],
                                     tie[i:i + 1], mode=mode, reduction="sum")
            smu += a
            slv += b
        torch.testing.assert_close(gmu, smu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(glv, slv, rtol=1e-5, atol=1e-6)
        assert gmu.sum().abs() < 1e-5  # d/dmu of a function of differences sums to 0


# ---- extreme tails vs mpmath --------------------------------------------------------------------------------

mpmath.mp.dps = 50


def _mp_loss(z, lv_w, lv_l, tie, mode, m):
    z, lv_w, lv_l = mpmath.mpf(z), mpmath.mpf(lv_w), mpmath.mpf(lv_l)
    var = mpmath.exp(lv_w) + mpmath.exp(lv_l)
    s = mpmath.sqrt(var)

    def rk(x):
        if not tie:
            return mpmath.log1p(mpmath.exp(m - x))
        th = mpmath.exp(m)
        ex = mpmath.exp(x)
        return -mpmath.log((th * th - 1) * ex / ((ex + th) * (1 + th * ex)))

    if mode == "thurstone":
        if not tie:
            return -mpmath.log(mpmath.ncdf((z - m) / s))
        a, b = (-m - z) / s, (m - z) / s
        if a + b > 0:  # upper tail: Phi(b) - Phi(a) = Phi(-a) - Phi(-b), without 1 - 1 at 50 digits
            a, b = -b, -a
        return -mpmath.log(mpmath.ncdf(b) - mpmath.ncdf(a))
    if mode == "bt":
        return rk(z)
    return mpmath.fsum(mpmath.mpf(w) * rk(z + s * mpmath.sqrt(2) * mpmath.mpf(x)) for x, w in zip(GH_X, GH_W))


def _mp_truth(z, lv_w, lv_l, tie, mode, m):
    f = lambda a, b, c: _mp_loss(a, b, c, tie, mode, m)  # noqa: E731
    return (f(z, lv_w, lv_l), mpmath.diff(lambda t: f(t, lv_w, lv_l), z),
            mpmath.diff(lambda t: f(z, t, lv_l), lv_w), mpmath.diff(lambda t: f(z, lv_w, t), lv_l))


EXTREME = [(z, a, b, t) for z, (a, b), t in itertools.product(
    [-1e4, -37.0, -1.0, 0.0, 0.25, 3.0, 1e4],
    [(-30.0, -30.0), (-30.0, 30.0), (30.0, 30.0), (0.0, -30.0), (2.0, 2.0)],
    [False, True])]


def extreme_pairs():
    """EXTREME as (mu, log_var, win, lose, tie): pair i compares candidate 2i (mu = z) with 2i+1 (mu = 0)."""
    n = len(EXTREME)
    mu = torch.tensor([v for z, *_ in EXTREME for v in (z, 0.0)])
    lv = torch.tensor([v for _, a, b, _ in EXTREME for v in (a, b)])
    win, lose = torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)
    tie = torch.tensor([t for *_, t in EXTREME])
    return mu, lv, win, lose, tie


@pytest.mark.parametrize("mode", ["thurstone", "bt_expected", "bt"])
def test_extremes_against_mpmath(mode):
    """|dmu| up to 1e4 and log_var in [-30, 30], with and without ties: finite, and right to fp32 precision."""
    m = 0.5
    mu, lv, win, lose, tie = extreme_pairs()
    loss, gmu, glv = loss_and_grads(jrm_kernels.gaussian_rank_loss, mu, lv, win, lose, tie, mode=mode,
                                    reduction="none", tie_margin=m)
    assert torch.isfinite(loss).all() and torch.isfinite(gmu).all() and torch.isfinite(glv).all()
    for i, (z, a, b, t) in enumerate(EXTREME):
        want = [float(v) for v in _mp_truth(z, a, b, t, mode, m)]
        got = [loss[i].item(), gmu[2 * i].item(), glv[2 * i].item(), glv[2 * i + 1].item()]
        for name, g, w in zip(("loss", "dmu", "dlv_w", "dlv_l"), got, want):
            assert math.isclose(g, w, rel_tol=2e-4, abs_tol=1e-6 * max(1.0, abs(want[0]))), \
                (mode, (z, a, b, t), name, g, w)
        assert gmu[2 * i + 1].item() == -gmu[2 * i].item()


def test_bf16_inputs_error_no_larger_than_torch_bf16():
    """bf16 mu/log_var are upcast after load: |ours - fp32 truth| <= |reference on bf16 - truth| + tol."""
    mu, lv, win, lose, tie = random_pairs(17, 60, seed=11)
    mu16, lv16 = mu.bfloat16(), lv.bfloat16()
    for mode in ("thurstone", "bt_expected", "bt"):
        truth = loss_and_grads(ref_loss, mu16.float(), lv16.float(), win, lose, tie, mode=mode)
        torch_bf16 = loss_and_grads(ref_loss, mu16, lv16, win, lose, tie, mode=mode)
        ours = loss_and_grads(jrm_kernels.gaussian_rank_loss, mu16, lv16, win, lose, tie, mode=mode)
        assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.bfloat16
        for o, t, w in zip(ours, torch_bf16, truth):
            err_ours = (o.float() - w.float()).abs()
            err_torch = (t.float() - w.float()).abs()
            assert (err_ours <= err_torch + 1e-5 + 1e-5 * w.float().abs()).all(), mode


def test_bad_inputs_raise_clear_errors():
    mu, lv = torch.zeros(3), torch.zeros(3)
    win, lose = torch.tensor([0, 1]), torch.tensor([1, 3])
    with pytest.raises(IndexError, match="3 candidates"):
        jrm_kernels.gaussian_rank_loss(mu, lv, win, lose)
    with pytest.raises(ValueError, match="mode="):
        jrm_kernels.gaussian_rank_loss(mu, lv, win, win, mode="plackett")
    with pytest.raises(ValueError, match="tie must be a bool mask"):
        jrm_kernels.gaussian_rank_loss(mu, lv, win, win, tie=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="tie_margin"):
        jrm_kernels.gaussian_rank_loss(mu, lv, win, win, tie=torch.tensor([True, False]), tie_margin=0.0)
    with pytest.raises(ValueError, match="1-D"):
        jrm_kernels.gaussian_rank_loss(mu[None], lv[None], win, win)
    with pytest.raises(ValueError, match="backend="):
        jrm_kernels.gaussian_rank_loss(mu, lv, win, win, backend="cuda")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        jrm_kernels.gaussian_rank_loss(torch.zeros(2), torch.zeros(2), torch.tensor([0]), torch.tensor([1]),
                                       backend="triton")
