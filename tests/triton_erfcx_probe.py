"""A one-line Triton kernel that evaluates jrm_kernels' erfcx device function (Triton kernels must live in
files, so the interpreter test imports it from here)."""
import torch
import triton
import triton.language as tl

from jrm_kernels import _tl_math as tm


@triton.jit
def _erfcx_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tm.erfcx_pos(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


def run_erfcx(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    _erfcx_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y
