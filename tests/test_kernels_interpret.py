"""The Triton kernels under the Triton interpreter (CPU), in fresh processes.

* ``tests/kernels_interpret_cases.py`` (kernel vs reference: both losses, grids of odd sizes, ties, repeated
  candidates, extremes, bf16, erfcx) runs in its own pytest process with TRITON_INTERPRET=1 set first;
* the lazy-import check and the liger-kernel peer check run as small scripts.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_interpreter_cases():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                          "ignore::RuntimeWarning", str(HERE / "kernels_interpret_cases.py")],
                         cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout


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
