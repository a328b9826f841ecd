"""Interpreter cases for the Triton kernels (CPU tensors, small shapes: the interpreter is slow).

Not collected directly (no test_ prefix): tests/test_kernels_interpret.py runs this file in a fresh pytest
process with TRITON_INTERPRET=1 set before anything imports triton — Triton's own standard-library functions
(tl.zeros_like, tl.sum, ...) are fixed as compiled or interpreted when triton.language is first imported, and
torch may import it early in a shared test process.
"""
import os

import pytest
import torch

import jrm_kernels
from jrm_dist.losses import gaussian_rank_loss as ref_rank, masked_lm_loss

import test_kernels_ce as ce_cases
import test_kernels_rank as rank_cases


if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/kernels_interpret_cases.py must run with TRITON_INTERPRET=1 (see its docstring)")


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
    mu, lv, win, lose, tie = rank_cases.extreme_pairs()
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
