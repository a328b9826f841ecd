"""jrm_kernels.fused_linear_masked_ce, CPU path: against the fp32 reference ``masked_lm_loss`` (and the tiny fp32
reference for smoothing / z-loss / soft-cap), bounded memory, and the num_items contract. The Triton kernels run
the same kinds of cases under the interpreter in test_kernels_interpret.py."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import jrm_kernels
from jrm_dist.losses import masked_lm_loss


def loss_and_grads(fn, hidden, weight, labels, bias=None, **kw):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    out = fn(h, w, labels, bias=b, **kw)
    out.sum().backward()
    return [out.detach()] + [t.grad for t in leaves if t is not None]


def make(n, h, v, seed, ignore_every=3, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    bias = (torch.randn(v, generator=g) * 0.1).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("n", [1, 7, 129, 300])
@pytest.mark.parametrize("v,hid", [(37, 8), (1001, 64)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(n, v, hid, reduction, with_bias):
    hidden, weight, bias, labels = make(n, hid, v, seed=n + v, ignore_every=3 if n > 1 else 0)
    bias = bias if with_bias else None
    want = loss_and_grads(masked_lm_loss, hidden, weight, labels, bias, reduction=reduction)
    # block_elems small enough that rows and vocabulary are both split into several tiles, V not a multiple
    got = loss_and_grads(jrm_kernels.fused_linear_masked_ce, hidden, weight, labels, bias, reduction=reduction,
                         block_elems=4000)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(softcap=2.0),
                                dict(label_smoothing=0.2, z_loss=1e-2, softcap=5.0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_extras_match_fp32_reference(kw, reduction):
    hidden, weight, bias, labels = make(67, 24, 203, seed=5, scale=3.0)
    want = loss_and_grads(jrm_kernels.reference_linear_ce, hidden, weight, labels, bias, reduction=reduction, **kw)
    got = loss_and_grads(jrm_kernels.fused_linear_masked_ce, hidden, weight, labels, bias, reduction=reduction,
                         block_elems=1500, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_reference_extras_off_is_masked_lm_loss_and_smoothing_is_torchs():
    hidden, weight, bias, labels = make(40, 16, 50, seed=9)
    torch.testing.assert_close(jrm_kernels.reference_linear_ce(hidden, weight, labels, bias),
                               masked_lm_loss(hidden, weight, labels, bias=bias))
    keep = labels != -100
    logits = hidden[keep] @ weight.t() + bias
    torch.testing.assert_close(jrm_kernels.fused_linear_masked_ce(hidden, weight, labels, bias, label_smoothing=0.3),
                               F.cross_entropy(logits, labels[keep], label_smoothing=0.3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction):
    hidden, weight, bias, _ = make(9, 8, 11, seed=1)
    labels = torch.full((9,), -100)
    out, dh, dw, db = loss_and_grads(jrm_kernels.fused_linear_masked_ce, hidden, weight, labels, bias,
                                     reduction=reduction)
    assert torch.isfinite(out).all() and not out.any()
    assert not dh.any() and not dw.any() and not db.any()


def test_num_items_makes_micro_batches_add_up_to_the_big_batch():
    """Two micro-batches with mean over the global token count = one big batch (loss and gradients)."""
    hidden, weight, _, labels = make(50, 16, 97, seed=4, ignore_every=4)
    big = loss_and_grads(jrm_kernels.fused_linear_masked_ce, hidden, weight, labels)
    total = int((labels != -100).sum())
    parts = [loss_and_grads(jrm_kernels.fused_linear_masked_ce, hidden[s], weight, labels[s], num_items=total)
             for s in (slice(0, 17), slice(17, 50))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], big[0])
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), big[1])
    torch.testing.assert_close(parts[0][2] + parts[1][2], big[2])
    assert not torch.equal(parts[0][0] * 2, big[0])  # the local mean would differ


def test_bf16_error_no_larger_than_torch_bf16():
    """bf16 inputs, fp32 math inside: |ours - fp32 truth| <= |torch bf16 - fp32 truth| + tol."""
    hidden, weight, bias, labels = make(129, 64, 1001, seed=2, dtype=torch.bfloat16, scale=2.0)
    truth = loss_and_grads(masked_lm_loss, hidden.float(), weight.float(), labels, bias.float(), reduction="none")

    def torch_bf16(h, w, y, bias=None, reduction="none"):
        keep = y != -100
        out = torch.zeros(y.shape, dtype=h.dtype)
        return out.masked_scatter(keep, F.cross_entropy(h[keep] @ w.t() + bias, y[keep], reduction="none"))

    same = loss_and_grads(torch_bf16, hidden, weight, labels, bias)
    ours = loss_and_grads(jrm_kernels.fused_linear_masked_ce, hidden, weight, labels, bias, reduction="none")
    assert [t.dtype for t in ours[1:]] == [torch.bfloat16] * 3
    for o, s, t in zip(ours, same, truth):
        err_ours = (o.float() - t).abs().max()
        err_torch = (s.float() - t).abs().max()
        assert err_ours <= err_torch + 1e-4, (err_ours, err_torch)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (to prove nothing [N, V]-sized is ever allocated)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_allocates_the_logits():
    n, hid, v, block = 600, 8, 5000, 20_000  # N*V = 3e6 logits; weight / its grad are 4e4
    hidden, weight, bias, labels = make(n, hid, v, seed=7, ignore_every=0)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    with _LargestTensor() as probe:
        jrm_kernels.fused_linear_masked_ce(h, w, labels, reduction="sum", block_elems=block).backward()
    assert probe.largest <= max(block, v * hid), probe.largest  # a logits tile, or dweight itself
    with _LargestTensor() as naive:
        masked_lm_loss(hidden.detach(), weight.detach(), labels)
    assert naive.largest >= n * v  # the probe does see a materialised [N, V]


def test_bad_inputs_raise_clear_errors():
    hidden, weight, bias, labels = make(5, 8, 11, seed=0, ignore_every=0)
    with pytest.raises(IndexError, match="vocabulary has 11 rows"):
        jrm_kernels.fused_linear_masked_ce(hidden, weight, torch.tensor([0, 1, 11, -100, 2]))
    with pytest.raises(ValueError, match=r"weight \[V, H\]"):
        jrm_kernels.fused_linear_masked_ce(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="labels must be"):
        jrm_kernels.fused_linear_masked_ce(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="label_smoothing"):
        jrm_kernels.fused_linear_masked_ce(hidden, weight, labels, label_smoothing=1.0)
    with pytest.raises(ValueError, match="reduction"):
        jrm_kernels.fused_linear_masked_ce(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="bias"):
        jrm_kernels.fused_linear_masked_ce(hidden, weight, labels, bias=bias[:3])
