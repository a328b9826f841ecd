"""The Triton kernels themselves, run on CPU tensors by the Triton interpreter (small shapes: it is slow).

TRITON_INTERPRET=1 is set for this module before jrm_kernels first builds its kernels (Triton reads it when a
kernel is defined; jrm_kernels imports its Triton modules lazily for that reason). The liger-kernel peer check
and the lazy-import check run in fresh subprocesses, where the variable is set before anything is imported.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import jrm_kernels
from jrm_dist.losses import gaussian_rank_loss as ref_rank, masked_lm_loss

import test_kernels_ce as ce_cases
import test_kernels_rank as rank_cases


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old


def triton_rank(*a, **kw):
    return jrm_kernels.gaussian_rank_loss(*a, backend="triton", **kw)


def torch_rank(*a, **kw):
    return jrm_kernels.gaussian_rank_loss(*a, backend="torch", **kw)


def triton_ce(*a, **kw):
    return jrm_kernels.fused_linear_masked_ce(*a, backend="triton", **kw)


def test_kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    triton_rank(torch.zeros(2), torch.zeros(2), torch.tensor([0]), torch.tensor([1]))
    from jrm_kernels import gaussian_rank

    assert isinstance(gaussian_rank._rank_fwd_kernel, InterpretedFunction)


@pytest.mark.parametrize("mode", ["thurstone", "bt_expected", "bt"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_rank_kernel_matches_reference(mode, reduction):
    # 3 candidates in 50 pairs: every candidate repeats many times (atomic accumulation)
    for k, p, seed in ((3, 50, 1), (11, 129, 2)):
        mu, lv, win, lose, tie = rank_cases.random_pairs(k, p, seed=seed)
        for t, ties in ((tie, "model"), (tie, "ignore"), (None, "model")):
            kw = dict(mode=mode, reduction=reduction, ties=ties)
            want = rank_cases.loss_and_grads(ref_rank, mu, lv, win, lose, t, **kw)
            got = rank_cases.loss_and_grads(triton_rank, mu, lv, win, lose, t, **kw)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("mode", ["thurstone", "bt_expected", "bt"])
def test_rank_kernel_extremes_match_cpu_path(mode):
    """Same extreme grid as the mpmath test; the CPU path is checked against mpmath there."""
    ex = rank_cases.EXTREME
    n = len(ex)
    mu = torch.tensor([v for z, *_ in ex for v in (z, 0.0)])
    lv = torch.tensor([v for _, a, b, _ in ex for v in (a, b)])
    win, lose = torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)
    tie = torch.tensor([t for *_, t in ex])
    got = rank_cases.loss_and_grads(triton_rank, mu, lv, win, lose, tie, mode=mode, reduction="none")
    want = rank_cases.loss_and_grads(torch_rank, mu, lv, win, lose, tie, mode=mode, reduction="none")
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=2e-5, atol=1e-6)


def test_rank_kernel_bf16():
    mu, lv, win, lose, tie = rank_cases.random_pairs(9, 40, seed=5)
    mu16, lv16 = mu.bfloat16(), lv.bfloat16()
    for mode in ("thurstone", "bt_expected"):
        truth = rank_cases.loss_and_grads(ref_rank, mu16.float(), lv16.float(), win, lose, tie, mode=mode)
        same = rank_cases.loss_and_grads(ref_rank, mu16, lv16, win, lose, tie, mode=mode)
        ours = rank_cases.loss_and_grads(triton_rank, mu16, lv16, win, lose, tie, mode=mode)
        for o, s, t in zip(ours, same, truth):
            assert ((o.float() - t).abs() <= (s.float() - t).abs() + 1e-5 + 1e-5 * t.abs()).all()


@pytest.mark.parametrize("n", [1, 7, 129])
@pytest.mark.parametrize("v", [37, 67])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_kernel_matches_reference(n, v, reduction):
    # H = 24 and V = 37 / 67 are not multiples of the interpreter tiles (16 / 32)
    hidden, weight, bias, labels = ce_cases.make(n, 24, v, seed=n * v, ignore_every=3 if n > 1 else 0)
    for b in (None, bias) if reduction == "sum" else (bias,):
        want = ce_cases.loss_and_grads(masked_lm_loss, hidden, weight, labels, b, reduction=reduction)
        got = ce_cases.loss_and_grads(triton_ce, hidden, weight, labels, b, reduction=reduction)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(label_smoothing=0.1, z_loss=1e-3), dict(softcap=3.0),
                                dict(label_smoothing=0.2, z_loss=1e-2, softcap=5.0)])
def test_ce_kernel_extras(kw):
    hidden, weight, bias, labels = ce_cases.make(33, 24, 67, seed=8, scale=3.0)
    want = ce_cases.loss_and_grads(jrm_kernels.reference_linear_ce, hidden, weight, labels, bias, **kw)
    got = ce_cases.loss_and_grads(triton_ce, hidden, weight, labels, bias, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_ce_kernel_all_ignored_and_num_items():
    hidden, weight, bias, _ = ce_cases.make(7, 24, 37, seed=3)
    out, dh, dw, db = ce_cases.loss_and_grads(triton_ce, hidden, weight, torch.full((7,), -100), bias)
    assert out.item() == 0.0 and not dh.any() and not dw.any() and not db.any()
    hidden, weight, _, labels = ce_cases.make(20, 24, 37, seed=4)
    got = ce_cases.loss_and_grads(triton_ce, hidden, weight, labels, num_items=100)
    want = ce_cases.loss_and_grads(masked_lm_loss, hidden, weight, labels, num_items=100)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_ce_kernel_bf16_upcast_after_load():
    hidden, weight, bias, labels = ce_cases.make(33, 24, 67, seed=6, dtype=torch.bfloat16, scale=2.0)
    truth = ce_cases.loss_and_grads(masked_lm_loss, hidden.float(), weight.float(), labels, bias.float(),
                                    reduction="none")
    same = ce_cases.loss_and_grads(
        lambda h, w, y, bias=None: torch.nn.functional.cross_entropy(h @ w.t() + bias, y, reduction="none"),
        hidden, weight, labels, bias)
    ours = ce_cases.loss_and_grads(triton_ce, hidden, weight, labels, bias, reduction="none")
    for o, s, t in zip(ours, same, truth):
        assert (o.float() - t).abs().max() <= (s.float() - t).abs().max() + 1e-4


def test_erfcx_device_function():
    """The kernels' erfcx (Triton has none) against torch.special.erfcx in float64, over [0, 1e30]."""
    from triton_erfcx_probe import run_erfcx  # a kernel needs a file: tests/triton_erfcx_probe.py

    x = torch.cat([torch.linspace(0, 12, 4001), torch.logspace(1, 30, 200)]).float()
    got = run_erfcx(x).double()
    want = torch.special.erfcx(x.double())
    assert torch.isfinite(got).all()
    assert ((got - want).abs() / want).max() < 5e-7


def _run_fresh(code: str, timeout: int = 240) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_env_var_set_after_import_is_honoured():
    """import jrm_kernels does not fix the Triton mode: setting TRITON_INTERPRET afterwards still works, and
    changing it after the kernels were built raises a clear error."""
    out = _run_fresh("""
        import os, torch, jrm_kernels
        mu, lv, w, l = torch.zeros(3), torch.zeros(3), torch.tensor([0, 1]), torch.tensor([1, 2])
        jrm_kernels.gaussian_rank_loss(mu, lv, w, l)            # CPU path, no Triton kernels built
        os.environ["TRITON_INTERPRET"] = "1"
        a = jrm_kernels.gaussian_rank_loss(mu, lv, w, l)        # now the interpreter
        from triton.runtime.interpreter import InterpretedFunction
        from jrm_kernels import gaussian_rank
        assert isinstance(gaussian_rank._rank_fwd_kernel, InterpretedFunction)
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            jrm_kernels.gaussian_rank_loss(mu, lv, w, l, backend="triton")
        except RuntimeError as e:
            print("refused:", "TRITON_INTERPRET" in str(e))
        print("ok", round(float(a), 6))
    """)
    assert "refused: True" in out and "ok 0.693147" in out


def test_liger_kernel_peer_agrees():
    """Our fused CE (Triton kernel, interpreted) vs liger-kernel's fused linear CE on the same inputs."""
    out = _run_fresh("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import torch, jrm_kernels
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        torch.manual_seed(0)
        n, hid, v = 33, 32, 97
        hidden, weight = torch.randn(n, hid), torch.randn(v, hid) * 0.2
        labels = torch.randint(0, v, (n,))
        labels[::4] = -100
        # liger's soft-cap path does not run under the interpreter; smoothing and z-loss do
        for ours_kw, liger_kw in (({}, {}), (dict(label_smoothing=0.1, z_loss=1e-3),
                                             dict(label_smoothing=0.1, lse_square_scale=1e-3))):
            for red in ("mean", "sum"):
                res = []
                for fn, kw in ((jrm_kernels.fused_linear_masked_ce, ours_kw),
                               (liger_fused_linear_cross_entropy, liger_kw)):
                    h = hidden.clone().requires_grad_(True)
                    w = weight.clone().requires_grad_(True)
                    loss = fn(h, w, labels, reduction=red, **kw)
                    loss.backward()
                    res.append((loss.detach(), h.grad, w.grad))
                for a, b in zip(*res):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        print("agree")
    """)
    assert "agree" in out
