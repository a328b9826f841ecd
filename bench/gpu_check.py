"""GPU acceptance kit: validate and measure jrm-dist on one GPU in one process, within a few minutes.

    python bench/gpu_check.py [--out bench/REPORT_GPU.md] [--budget-s 420]     # on a CUDA machine
    python bench/gpu_check.py --cpu --out /tmp/r.md                            # tiny shapes, Triton interpreter

Sections (each guarded: a failure is recorded and the next section still runs; the report is rewritten after
every line, so a kill leaves what was measured so far):

1. kernels  — jrm_kernels' Triton kernels (compiled natively on the GPU; interpreted with ``--cpu``) against the
   torch references: values and gradients, fp32 and bf16, over the case grids of tests/test_kernels_rank.py and
   tests/test_kernels_ce.py (read from their ``pytest.mark.parametrize`` marks), their extreme-value grid, masked
   rows, and on the GPU real widths (H 3584, V 152064).
2. speed    — rank loss vs the 1000-sample Monte-Carlo loss; fused linear CE vs full-logits CE, the masked torch
   reference and liger-kernel's fused linear CE (if importable) at H 8192, V 152064, T 4096, 10% labelled:
   time (CUDA events) and peak memory (torch.cuda.max_memory_allocated above the inputs).
3. step     — one bf16 joint training step (model.JointRewardModel + objective.joint_objective + torch AdamW, no
   DeepSpeed) of a Qwen2.5-VL at 7B width with few layers and random weights (config from
   jrm_dist/model_configs/qwen2_5_vl_7b.json), real image (448x448 -> 256 tokens) and rationale lengths:
   tokens/s, MFU against the GPU's dense bf16 peak, attention variants, packed vs unpacked when
   ``data.packing`` exists, and jrm-plan's prediction for the same workload.

Exit status: 0 when every correctness check passed and no section raised; 1 otherwise; 2 for bad usage (no GPU
without ``--cpu``). Imports nothing from deepspeed, webdataset or mlflow: the bare GPU image lacks them.
"""
from __future__ import annotations

import os
import sys

if "--cpu" in sys.argv[1:]:
    # Triton fixes interpreted vs compiled when triton.language is first imported (torch may import it early)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (str(ROOT), str(BENCH)):  # the repository need not be installed on the GPU machine
    if p not in sys.path:
        sys.path.insert(0, p)
sys.path.append(str(ROOT / "tests"))  # the kernel test modules, for their case grids and helpers

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _result import emit  # noqa: E402

GIB = 1 << 30
# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets; matched against
# torch.cuda.get_device_name() in this order. An assumption the report states; --peak-tflops overrides it.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0),
)
# jrm-plan's GPU preset to use for the same device (memory, HBM and link figures); peak comes from above
PLAN_GPU = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"))
OPTIONAL = ("deepspeed", "webdataset", "mlflow", "bitsandbytes", "liger_kernel", "flash_attn")


# ----------------------------------------------------------------------------------------------------- report
class Report:
    """Markdown report rewritten after every entry (a killed run keeps what it had) + RESULT/CHECK lines."""

    def __init__(self, path: Path, header: list[str]):
        self.path = path
        self.header = header
        self.blocks: list[list[str]] = []
        self.passed = self.failed = 0
        self.errors: list[str] = []
        self.skipped: list[str] = []
        self.results: list[dict] = []
        self.t0 = time.time()
        self.finished = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)
        self.blocks.append([f"## {title}", ""])
        self.write()

    def _add(self, line: str) -> None:
        if not self.blocks:
            self.blocks.append([])
        self.blocks[-1].append(line)
        self.write()

    def note(self, text: str) -> None:
        print(text, flush=True)
        self._add(text + "  ")

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.passed += bool(ok)
        self.failed += not ok
        print(f"CHECK {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        self._add(f"- {'ok' if ok else '**FAIL**'} `{name}`: {detail}")
        return ok

    def result(self, name: str, ours: float, baseline: float, unit: str, higher_is_better: bool,
               note: str = "") -> None:
        emit(name, ours, baseline, unit, higher_is_better, note)
        ratio = ours / baseline if baseline else float("nan")
        self.results.append({"name": name, "ours": ours, "baseline": baseline, "ratio": ratio, "unit": unit})
        better = "higher" if higher_is_better else "lower"
        self._add(f"- RESULT `{name}`: ours {ours:.4g} vs baseline {baseline:.4g} {unit} -> ratio {ratio:.3f} "
                  f"({better} is better){'; ' + note if note else ''}")

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")
        self.note(f"SKIP {what}: {why}")

    def error(self, where: str, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.errors.append(f"{where}: {type(exc).__name__}: {exc}")
        print(f"ERROR in {where}:\n{tb}", flush=True)
        self._add(f"- **ERROR** in {where}: `{type(exc).__name__}: {str(exc)[:300]}`")
        self._add("```\n" + "\n".join(tb.strip().splitlines()[-12:]) + "\n```")

    def ok(self) -> bool:
        return self.failed == 0 and not self.errors

    def write(self) -> None:
        status = ("complete" if self.finished else
                  "**INCOMPLETE** (still running, or stopped before the end: a timeout or a crash)")
        summary = (f"**Status**: {status}.  \n**Summary**: checks {self.passed} passed, {self.failed} failed; "
                   f"{len(self.errors)} section error(s); {len(self.skipped)} skipped; "
                   f"{time.time() - self.t0:.0f} s so far")
        text = "\n".join(self.header + ["", summary, ""] + [ln for b in self.blocks for ln in b + [""]])
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(self.path)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(fn, dev: torch.device, budget_s: float, min_reps: int = 3, max_reps: int = 20,
            warm: bool = True) -> float:
    """Median seconds per call after one warm-up call (compilation, autotuning, allocator; ``warm=False`` when
    the caller already ran one); CUDA events on a GPU, perf_counter on CPU. The repeats fit ``budget_s``."""
    t_warm = time.perf_counter()
    if warm:
        fn()
    sync(dev)
    t_warm = time.perf_counter() - t_warm

    def once() -> float:
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    times = [once()]
    if max(t_warm, times[0]) > budget_s:
        min_reps = 1  # a slow call (seconds): one sample is the measurement, the slot's time is short
    reps = max(min_reps, min(max_reps, int(budget_s / max(times[0], 1e-6))))
    times += [once() for _ in range(reps - 1)]
    return statistics.median(times)


def peak_extra_bytes(fn, dev: torch.device) -> float | None:
    """Runs ``fn``; returns its peak allocated bytes above what was allocated before (GPU; None on CPU)."""
    if dev.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return float(torch.cuda.max_memory_allocated(dev) - base)


def param_grid(test_fn):
    """The keyword sets of a test's ``pytest.mark.parametrize`` marks (their cartesian product), so the kit runs
    the case grid the unit tests run, not a second copy of it."""
    axes = []
    for mark in getattr(test_fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        axes.append([dict(zip(names, v if len(names) > 1 else (v,))) for v in mark.args[1]])
    for combo in itertools.product(*axes):
        out = {}
        for part in combo:
            out.update(part)
        yield out


def thin(cases, cpu: bool, every: int):
    """--cpu keeps every ``every``-th case (the interpreter is slow; tests/test_kernels_interpret.py runs the
    whole grids interpreted): the kit's code paths still all run."""
    return [c for i, c in enumerate(cases) if not cpu or i % every == 0]


def _to(dev, *ts):
    return [t.to(dev) if isinstance(t, torch.Tensor) else t for t in ts]


def _worst(errs, allowed) -> float:
    """max over tensors of error / allowed error (> 1 fails; inf for a non-finite result)."""
    out = 0.0
    for e, a in zip(errs, allowed):
        if e.numel():
            r = float((e / a).max())
            out = max(out, r if math.isfinite(r) else float("inf"))
    return out


def tol_ratio(got, want, rtol: float, atol: float) -> float:
    """Worst |got - want| in units of allclose's allowance atol + rtol |want| (a NaN or inf counts as inf)."""
    errs = [(g.float() - w.float()).abs().nan_to_num(float("inf"), float("inf")) for g, w in zip(got, want)]
    return _worst(errs, [atol + rtol * w.float().abs() for w in want])


def bf16_ratio(ours, same, truth, slack_abs: float, slack_rel: float, elementwise: bool) -> float:
    """Worst error of ours vs the fp32 truth in units of (the torch bf16 path's own error + slack): <= 1 means
    ours is no worse than torch in bf16 (elementwise, or comparing the max errors per tensor)."""
    errs, allowed = [], []
    for o, s, t in zip(ours, same, truth):
        e = (o.float() - t).abs().nan_to_num(float("inf"), float("inf"))
        a = (s.float() - t).abs() + slack_abs + slack_rel * t.abs()
        if not elementwise and e.numel():
            e, a = e.max().reshape(1), a.max().reshape(1)
        errs.append(e)
        allowed.append(a)
    return _worst(errs, allowed)


class guarded:
    """``with guarded(rep, name):`` records an exception of the block as an error of ``name`` and carries on."""

    def __init__(self, rep: Report, name: str):
        self.rep, self.name = rep, name

    def __enter__(self):
        return self

    def __exit__(self, et, e, tb) -> bool:
        if et is None or not issubclass(et, Exception):
            return False
        self.rep.error(self.name, e)
        return True


class Group:
    """Many cases, one CHECK line: count, worst error in units of the tolerance, the first failures by name."""

    def __init__(self, rep: Report, name: str, budget: "Budget | None" = None, reserve_s: float = 0.0):
        self.rep, self.name, self.n, self.bad, self.worst = rep, name, 0, [], 0.0
        self.budget, self.reserve_s, self.cut = budget, reserve_s, False

    def time_ok(self) -> bool:
        """False once the time budget is down to the reserve kept for the later sections (stop adding cases)."""
        if self.budget is not None and self.budget.left() < self.reserve_s and not self.cut:
            self.cut = True
            self.rep.skip(f"{self.name} (after {self.n} cases)", "time budget: the rest of the grid is not run")
        return not self.cut

    def add(self, case: str, ratio: float) -> None:
        self.n += 1
        self.worst = max(self.worst, ratio)
        if not ratio <= 1.0:
            self.bad.append(f"{case} ({ratio:.3g} x tol)")

    def done(self, tol: str) -> None:
        detail = f"{self.n - len(self.bad)}/{self.n} cases within {tol}; worst {self.worst:.3g} x tolerance"
        if self.bad:
            detail += "; failing: " + "; ".join(self.bad[:8]) + (" ..." if len(self.bad) > 8 else "")
        self.rep.check(self.name, not self.bad and self.n > 0, detail)


# --------------------------------------------------------------------------------------------- 1. correctness
def section_kernels(rep: Report, dev: torch.device, cpu: bool, budget: Budget) -> None:
    import jrm_kernels
    import test_kernels_ce as ce_t
    import test_kernels_rank as rk_t
    from jrm_dist.losses import gaussian_rank_loss as ref_rank, masked_lm_loss

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references must be fp32
    reserve = 0.0 if cpu else 0.45 * budget.left()  # compile-heavy: keep time for the speed and step sections
    rep.note(f"Triton mode: {'interpreted (TRITON_INTERPRET=1, CPU tensors)' if cpu else 'compiled, ' + str(dev)}; "
             f"grids from tests/test_kernels_rank.py and tests/test_kernels_ce.py")

    def tri_rank(*a, **kw):
        return jrm_kernels.gaussian_rank_loss(*a, backend="triton", **kw)

    def tri_ce(*a, **kw):
        return jrm_kernels.fused_linear_masked_ce(*a, backend="triton", **kw)

    # each group guarded: an exception is recorded as an error and the next group still runs
    with guarded(rep, "rank_fp32_grid"):
        # --- rank loss, fp32: the reference grid (modes x ties x reductions x sizes)
        g = Group(rep, "rank_fp32_grid", budget, reserve)
        for kw in thin(list(param_grid(rk_t.test_matches_reference)), cpu, 7):
            if not g.time_ok():
                break
            k, p = kw.pop("k"), kw.pop("p")
            mu, lv, win, lose, tie = _to(dev, *rk_t.random_pairs(k, p, seed=k * 1000 + p))
            kw["tie_margin"] = 0.7
            want = rk_t.loss_and_grads(ref_rank, mu, lv, win, lose, tie, **kw)
            got = rk_t.loss_and_grads(tri_rank, mu, lv, win, lose, tie, **kw)
            g.add(f"k={k} p={p} {kw}", tol_ratio(got, want, 2e-5, 2e-6))
        g.done("rtol 2e-5, atol 2e-6 of the fp32 reference")

    with guarded(rep, "rank_fp32_extremes"):
        # --- rank loss, extremes (|dmu| to 1e4, log_var +-30, ties): vs the CPU path, checked against mpmath in tests
        g = Group(rep, "rank_fp32_extremes", budget, reserve)
        mu, lv, win, lose, tie = rk_t.extreme_pairs()
        for mode in ("thurstone", "bt_expected", "bt"):
            if not g.time_ok():
                break
            kw = dict(mode=mode, reduction="none", tie_margin=0.5)
            want = rk_t.loss_and_grads(jrm_kernels.gaussian_rank_loss, mu, lv, win, lose, tie, backend="torch", **kw)
            got = [t.cpu() for t in rk_t.loss_and_grads(tri_rank, *_to(dev, mu, lv, win, lose, tie), **kw)]
            g.add(mode, tol_ratio(got, want, 2e-5, 1e-6))
        g.done("rtol 2e-5, atol 1e-6 of the CPU path (mpmath-verified in tests)")

    with guarded(rep, "rank_bf16_grid"):
        # --- rank loss, bf16 inputs: error vs the fp32 truth no larger than the reference's own bf16 error
        g = Group(rep, "rank_bf16_grid", budget, reserve)
        for kw in thin(list(param_grid(rk_t.test_matches_reference)), cpu, 11):
            if not g.time_ok():
                break
            k, p = kw.pop("k"), kw.pop("p")
            mu, lv, win, lose, tie = _to(dev, *rk_t.random_pairs(k, p, seed=k * 1000 + p))
            mu16, lv16 = mu.bfloat16(), lv.bfloat16()
            truth = rk_t.loss_and_grads(ref_rank, mu16.float(), lv16.float(), win, lose, tie, **kw)
            # torch's own bf16 error: the reference evaluated in bf16 on the CPU (CUDA has no bf16 erfcx / log_ndtr)
            same = [t.to(dev) for t in rk_t.loss_and_grads(ref_rank, *_to(torch.device("cpu"), mu16, lv16, win, lose,
                                                                                tie), **kw)]
            ours = rk_t.loss_and_grads(tri_rank, mu16, lv16, win, lose, tie, **kw)
            g.add(f"k={k} p={p} {kw}", bf16_ratio(ours, same, truth, 1e-5, 2.0 ** -8, elementwise=True))
        g.done("|ours - fp32 truth| <= |torch bf16 - truth| + 1e-5 + 2^-8 |truth| elementwise (ours are rounded to "
               "bf16 once, at the end)")

    with guarded(rep, "ce_fp32_grid"):
        # --- fused CE, fp32: the reference grid (rows x (V, H) x reductions x bias), every third row ignored
        g = Group(rep, "ce_fp32_grid", budget, reserve)
        small = [kw for kw in param_grid(ce_t.test_matches_reference) if not cpu or kw["n"] * kw["v"] <= 10_000]
        for kw in thin(small, cpu, 4):
            if not g.time_ok():
                break
            n, v, hid, red, wb = kw["n"], kw["v"], kw["hid"], kw["reduction"], kw["with_bias"]
            hidden, weight, bias, labels = _to(dev, *ce_t.make(n, hid, v, seed=n + v, ignore_every=3 if n > 1 else 0))
            bias = bias if wb else None
            want = ce_t.loss_and_grads(masked_lm_loss, hidden, weight, labels, bias, reduction=red)
            got = ce_t.loss_and_grads(tri_ce, hidden, weight, labels, bias, reduction=red)
            g.add(f"{kw}", tol_ratio(got, want, 1e-5, 1e-5))
        for kw in thin(list(param_grid(ce_t.test_extras_match_fp32_reference)), cpu, 3):  # smoothing, z-loss, softcap
            if not g.time_ok():
                break
            extra, red = kw["kw"], kw["reduction"]
            hidden, weight, bias, labels = _to(dev, *ce_t.make(67, 24, 203, seed=5, scale=3.0))
            want = ce_t.loss_and_grads(jrm_kernels.reference_linear_ce, hidden, weight, labels, bias, reduction=red,
                                       **extra)
            got = ce_t.loss_and_grads(tri_ce, hidden, weight, labels, bias, reduction=red, **extra)
            g.add(f"extras {extra} {red}", tol_ratio(got, want, 1e-5, 1e-5))
        for red in thin(["mean", "sum", "none"], cpu, 2):  # every row masked: zero loss, zero gradients
            if not g.time_ok():
                break
            hidden, weight, bias, _ = _to(dev, *ce_t.make(9, 8, 11, seed=1))
            out, dh, dw, db = ce_t.loss_and_grads(tri_ce, hidden, weight, torch.full((9,), -100, device=dev), bias,
                                                 reduction=red)
            zero = [torch.zeros_like(t) for t in (out, dh, dw, db)]
            g.add(f"all rows ignored {red}", tol_ratio([out, dh, dw, db], zero, 0.0, 1e-30))
        g.done("rtol 1e-5, atol 1e-5 of the fp32 reference")

    with guarded(rep, "ce_bf16_grid"):
        # --- fused CE, bf16: error vs the fp32 truth no larger than torch's bf16 logits path. The gradients are
        # rounded to bf16 at the end (and, compiled, dlogits before the tensor-core dots), as torch's are: a
        # max-vs-max comparison of two equally rounded results needs one bf16 rounding step (2^-8 |truth|) of slack
        ce_bf16_rel = 2.0 ** -8
        ce_bf16_tol = " + 2^-8 |truth|"
        g = Group(rep, "ce_bf16_grid", budget, reserve)
        # the fp32 grid's shapes (with bias) in bf16, plus the unit tests' two bf16 cases (scale 2: larger logits)
        cases = [dict(kw, seed=kw["n"] + kw["v"]) for kw in param_grid(ce_t.test_matches_reference) if kw["with_bias"]]
        cases += [dict(n=129, v=1001, hid=64, reduction="none", seed=2, scale=2.0),  # test_bf16_error_no_larger...
                  dict(n=33, v=67, hid=24, reduction="none", seed=6, scale=2.0)]  # test_ce_kernel_bf16_upcast...
        for c in thin([c for c in cases if not cpu or c["n"] * c["v"] <= 10_000], cpu, 3):
            if not g.time_ok():
                break
            hidden, weight, bias, labels = _to(dev, *ce_t.make(c["n"], c["hid"], c["v"], seed=c["seed"],
                                                               ignore_every=3 if c["n"] > 1 else 0,
                                                               dtype=torch.bfloat16, scale=c.get("scale", 1.0)))
            red = c["reduction"]
            truth = ce_t.loss_and_grads(masked_lm_loss, hidden.float(), weight.float(), labels, bias.float(),
                                        reduction=red)
            same = ce_t.loss_and_grads(lambda h, w, y, bias=None: F.cross_entropy(h @ w.t() + bias, y, reduction=red),
                                       hidden, weight, labels, bias)
            ours = ce_t.loss_and_grads(tri_ce, hidden, weight, labels, bias, reduction=red)
            g.add(f"{c}", bf16_ratio(ours, same, truth, 1e-4, ce_bf16_rel, elementwise=False))
        g.done(f"max |ours - fp32 truth| <= max |torch bf16 logits CE - truth| + 1e-4{ce_bf16_tol}")

    with guarded(rep, "ce_real_width"):
        # --- fused CE at real widths and odd shapes: native bf16 tensor-core tiles, fp32 ieee tiles (--cpu: toy sizes)
        g = Group(rep, "ce_real_width", budget, reserve)
        sizes = ((257, 1000, 32003), (257, 1000, 32003), (2048, 3584, 152064)) if not cpu else \
            ((64, 40, 300), (64, 40, 300), (70, 24, 333))
        for (n, hid, v), dt in zip(sizes, (torch.float32, torch.bfloat16, torch.bfloat16)):
            if not g.time_ok():
                break
            gen = torch.Generator(device=dev).manual_seed(n + v)
            hidden = torch.randn(n, hid, device=dev, generator=gen).to(dt)
            weight = (torch.randn(v, hid, device=dev, generator=gen) / hid ** 0.5).to(dt)
            labels = torch.randint(0, v, (n,), device=dev, generator=gen)
            labels[torch.rand(n, device=dev, generator=gen) > 0.1] = -100  # 10% labelled, as in training
            truth = ce_t.loss_and_grads(masked_lm_loss, hidden.float(), weight.float(), labels, reduction="sum")
            ours = ce_t.loss_and_grads(tri_ce, hidden, weight, labels, reduction="sum")
            if dt == torch.float32:
                ratio, tol = tol_ratio(ours, truth, 1e-4, 1e-4), "fp32 rtol/atol 1e-4"
            else:
                same = ce_t.loss_and_grads(
                    lambda h, w, y, bias=None: F.cross_entropy(h @ w.t(), y, reduction="sum"), hidden, weight, labels)
                ratio, tol = bf16_ratio(ours, same, truth, 1e-4, ce_bf16_rel, elementwise=False), "bf16 rule"
            g.add(f"n={n} H={hid} V={v} {str(dt)[6:]} ({tol})", ratio)
            del truth, ours
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        g.done("per dtype (see cases)")


# ---------------------------------------------------------------------------------------------- 2. speed / memory
def section_speed(rep: Report, dev: torch.device, cpu: bool, budget: Budget) -> None:
    import jrm_kernels
    from jrm_dist.losses import masked_lm_loss, mc_bt_loss

    # --- rank loss vs Monte-Carlo
    n_cand, n_pairs = (64, 128) if cpu else (8192, 32768)
    g = torch.Generator(device=dev).manual_seed(0)
    mu0 = torch.randn(n_cand, device=dev, generator=g)
    lv0 = torch.randn(n_cand, device=dev, generator=g) * 0.5
    win = torch.randint(0, n_cand, (n_pairs,), device=dev, generator=g)
    lose = (win + torch.randint(1, n_cand, (n_pairs,), device=dev, generator=g)) % n_cand

    def rank_run(fn):
        def run():
            mu, lv = mu0.clone().requires_grad_(True), lv0.clone().requires_grad_(True)
            fn(mu, lv).backward()
        return run

    t_mc = time_fn(rank_run(lambda mu, lv: mc_bt_loss(mu, lv, win, lose, n_samples=1000)), dev, 0.5)
    for mode in ("thurstone", "bt_expected"):
        t = time_fn(rank_run(lambda mu, lv: jrm_kernels.gaussian_rank_loss(mu, lv, win, lose, mode=mode)), dev, 0.5)
        rep.result(f"rank_fwd_bwd_{mode}_vs_mc1000", t * 1e3, t_mc * 1e3, "ms", False,
                   note=f"{n_cand} candidates, {n_pairs} pairs, {dev.type}")

    # --- fused linear CE vs full logits / masked reference / liger-kernel
    T, H, V = (128, 32, 200) if cpu else (4096, 8192, 152064)
    dt = torch.bfloat16
    hidden = torch.randn(T, H, device=dev, generator=g).to(dt).requires_grad_(True)
    weight = (torch.randn(V, H, device=dev, generator=g) * H ** -0.5).to(dt).requires_grad_(True)
    labels = torch.full((T,), -100, dtype=torch.long, device=dev)
    pos = torch.randperm(T, device=dev, generator=g)[: max(1, T // 10)]
    labels[pos] = torch.randint(0, V, (pos.numel(),), device=dev, generator=g)
    methods = {
        "fused": lambda: jrm_kernels.fused_linear_masked_ce(hidden, weight, labels),
        "full_logits": lambda: F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100),
        "masked_ref": lambda: masked_lm_loss(hidden, weight, labels),
    }
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        methods["liger"] = lambda: liger_fused_linear_cross_entropy(hidden, weight, labels, reduction="mean")
    except Exception as e:  # ImportError, or a version clash with this torch / triton: the peer is optional
        rep.skip("ce liger-kernel peer", f"liger_kernel not importable ({type(e).__name__}: {e}); install it from "
                                         "the wheelhouse")
    rep.note(f"LM-head CE fwd+bwd: T={T}, H={H}, V={V}, {pos.numel()} labelled rows, bf16 inputs; peak = "
             f"max allocated above the inputs (gradients included)")
    stats, losses = {}, {}
    for name, fn in methods.items():
        if budget.left() < (20 if cpu else 60):
            rep.skip(f"ce {name}", "time budget")
            continue

        def run(fn=fn, name=name):
            hidden.grad = weight.grad = None
            loss = fn()
            loss.backward()
            losses[name] = float(loss.detach())
        try:
            timed = []  # peak memory over the same calls that are timed (a slow method runs only twice)
            mem = peak_extra_bytes(lambda: timed.append(time_fn(run, dev, 0.5 if cpu else 3.0,
                                                                 min_reps=1 if cpu else 3)), dev)
            t = timed[0]
        except torch.OutOfMemoryError as e:
            rep.skip(f"ce {name}", f"out of memory ({str(e)[:120]})")
            continue
        except Exception as e:  # ours failing is an error; a baseline or peer failing only loses that row
            if name == "fused":
                rep.error(f"ce {name}", e)
            else:
                rep.skip(f"ce {name}", f"{type(e).__name__}: {str(e)[:160]}")
            continue
        finally:
            hidden.grad = weight.grad = None
        stats[name] = (t, mem)
        rep.note(f"  {name:12s} {t * 1e3:10.2f} ms  peak " + (f"{mem / GIB:.2f} GiB" if mem is not None else
                                                                "n/a (CPU)") + f"  loss {losses[name]:.5f}")
    if "fused" in stats:
        ref = losses.get("masked_ref", losses.get("full_logits"))
        if ref is not None:
            rep.check("ce_fused_loss_matches_at_bench_size", abs(losses["fused"] - ref) <= 2e-3 * max(1.0, abs(ref)),
                      f"fused {losses['fused']:.6f} vs torch {ref:.6f} (bf16 inputs, fp32 math; tol 2e-3 rel)")
        t0, m0 = stats["fused"]
        for base in ("full_logits", "masked_ref", "liger"):
            if base not in stats:
                continue
            t1, m1 = stats[base]
            note = f"T={T} H={H} V={V}, 10% labelled, bf16, fwd+bwd"
            rep.result(f"ce_fused_vs_{base}_time", t0 * 1e3, t1 * 1e3, "ms", False, note)
            if m0 is not None and m1 is not None:
                rep.result(f"ce_fused_vs_{base}_peak_mem", m0 / GIB, m1 / GIB, "GiB", False, note)


# -------------------------------------------------------------------------------------------- 3. training step
def _peak_tflops(dev: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"{override:g} TFLOP/s (--peak-tflops)"
    if dev.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(dev)
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak, f"{peak:g} TFLOP/s dense bf16 (data-sheet figure assumed for '{name}' via '{key}')"
    return None, f"unknown for '{name}': pass --peak-tflops"


def _model_json(cpu: bool, layers: int, depth: int, tok_ids: dict) -> dict:
    cfg = json.loads((ROOT / "jrm_dist/model_configs/qwen2_5_vl_7b.json").read_text())
    cfg.update(num_hidden_layers=layers, max_window_layers=layers, **tok_ids)
    v = cfg["vision_config"]
    v.update(depth=depth, fullatt_block_indexes=[depth - 1])
    if cpu:  # same architecture, toy widths (head_dim 16 -> mrope sections sum to 8)
        cfg.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=320)  # > the offline tokenizer's ids (reward token included)
        cfg["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
        v.update(hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, window_size=56)
    return cfg


def _hf_config(cfg_json: dict):
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg_json))
        return AutoConfig.from_pretrained(d)


def _groups(processor, n_groups: int, side: int, rat_range: tuple[int, int], seed: int):
    """EditReward-like groups: one source image shared by K=2 candidates, each with its own edited image and a
    rationale of a length drawn from ``rat_range`` tokens (win = candidate 0)."""
    import numpy as np
    from PIL import Image

    from jrm_dist.data.collate import EncodedGroup

    rng = np.random.default_rng(seed)
    words = ("the square is now red and the instruction asked for blue so the edit does not follow it while the "
             "background stays consistent with the source image overall quality is good ").split()
    long_ids = processor.tokenizer(" ".join(words * 60), add_special_tokens=False)["input_ids"]

    def image():
        return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))

    groups = []
    for i in range(n_groups):
        src = image()
        cands = []
        for _ in range(2):
            n_tok = int(rng.integers(rat_range[0], rat_range[1] + 1))
            rationale = processor.tokenizer.decode(long_ids[:n_tok])
            cands.append(processor.encode("make the square blue", [src], [image()], None, rationale))
        groups.append(EncodedGroup(f"g{i}", cands, [0], [1], [False]))
    return groups


def section_step(rep: Report, dev: torch.device, cpu: bool, budget: Budget, args) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration
    try:  # the PIL backend needs no torchvision (transformers >= 5 with it); else the default processor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as ImgProc
    except ImportError:
        from transformers import Qwen2VLImageProcessor as ImgProc

    from jrm_dist import plan as jplan
    from jrm_dist.backbones import QWEN_SPECIAL_TOKENS, build_tiny_tokenizer
    from jrm_dist.config import DataConfig, load_config
    from jrm_dist.data.collate import Collator
    from jrm_dist.model import JointRewardModel, add_reward_token
    from jrm_dist.objective import joint_objective
    from jrm_dist.processing import RewardProcessor

    layers, depth = (2, 2) if cpu else (args.layers, args.vision_depth)
    n_groups = 2 if cpu else args.groups
    side, rat = (56, (3, 6)) if cpu else (448, (100, 250))
    max_pixels = side * side
    max_len = 512 if cpu else 2048
    # tokenizer: the offline byte-level BPE with Qwen's special tokens (no download); ids fit the 152k vocab
    tok = build_tiny_tokenizer(vocab_size=300 if cpu else 1024)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    processor = RewardProcessor(tok, ImgProc(), max_pixels=max_pixels, min_pixels=3136,
                                max_length=max_len)
    cfg_json = _model_json(cpu, layers, depth, dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]))
    hf_cfg = _hf_config(cfg_json)
    groups = _groups(processor, n_groups, side, rat, seed=0)
    has_packing = "packing" in DataConfig.__dataclass_fields__
    dt = torch.bfloat16

    def to_dev(batch):
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(dev)
                if v.is_floating_point():
                    v = v.to(dt)
            out[k] = v
        return out

    batch = to_dev(Collator(processor)(groups))
    B, T = batch["input_ids"].shape
    real_tokens = int(batch["attention_mask"].sum())
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    img_tokens = int((batch["input_ids"] == ids["<|image_pad|>"]).sum()) // (2 * B)
    rep.note(f"model: Qwen2.5-VL 7B json with {layers} text layers, {depth} vision blocks, "
             f"{'toy widths (--cpu)' if cpu else 'hidden 3584, vocab 152064'}, random weights, bf16, "
             f"head_hidden 1024; batch {n_groups} groups x 2 candidates = {B} sequences padded to {T} tokens "
             f"({real_tokens} real), 2 images x {img_tokens} tokens per sequence, {labelled} labelled tokens")

    torch.manual_seed(0)
    with torch.device(dev):
        backbone = Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, dtype=dt, attn_implementation="sdpa")
    rid = processor.reward_token_id
    add_reward_token(backbone, rid)
    model = JointRewardModel(backbone, rid, head_hidden=1024).to(dev)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=dev.type == "cuda")

    def plan_cfg(ckpt: bool):  # the 7B recipe with this run's batch, pixel budget, length and settings
        return load_config(str(ROOT / "configs/qwen2_5_vl_7b.yaml"), [
            f"data.groups_per_batch={n_groups}", f"data.max_length={max_len}", f"data.max_pixels={max_pixels}",
            f"model.gradient_checkpointing={str(ckpt).lower()}", "model.attn_implementation=sdpa"])

    jcfg = plan_cfg(False)

    def train_step(b):
        out = model(b)
        obj = joint_objective(out, b, jcfg.loss, step=0)
        obj["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return obj

    obj = train_step(batch)  # warm-up: kernels compile, optimizer states appear
    sync(dev)
    rep.check("step_losses_finite", bool(torch.isfinite(obj["loss"])) and bool(torch.isfinite(obj["lm"])),
              f"loss {float(obj['loss'].detach()):.4f} (rank {float(obj['rank']):.4f}, lm {float(obj['lm']):.4f}), "
              f"{n_params / 1e9:.3f} B params")
    step_budget = 0.5 if cpu else 4.0
    timed = []  # peak memory over the timed steps (optimizer states exist after the warm-up step)
    mem = peak_extra_bytes(lambda: timed.append(time_fn(lambda: train_step(batch), dev, step_budget,
                                                        min_reps=1 if cpu else 3, max_reps=10, warm=False)), dev)
    t_step = timed[0]
    peak_alloc = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    peak, peak_note = _peak_tflops(dev, args.peak_tflops)
    rep.note(f"bf16 peak assumed: {peak_note}")

    # jrm-plan for the same architecture and workload, one GPU (no ZeRO traffic)
    arch = jplan.read_arch(cfg_json, "qwen2_5_vl_7b.json (layers reduced)")
    w = jplan.Workload(n_groups, 2, T, 2, img_tokens, labelled // B)
    gpu_key = next((k for name, k in PLAN_GPU if dev.type == "cuda" and name in torch.cuda.get_device_name(dev)),
                   "h200")
    mem_g, p_peak, hbm, nvl, net = jplan.GPUS[gpu_key]
    cluster = jplan.Cluster(1, 1, mem_g, peak or p_peak, hbm, nvl, net)
    pred = jplan.plan_for(jcfg, arch, w, cluster, "fused", 0.1, 3.0, 0.6)
    model_flops, _ = jplan.flops(jcfg, arch, w, "fused")
    tok_s = B * T / t_step
    rep.note(f"measured: {t_step * 1e3:.1f} ms/step, {tok_s:.0f} tokens/s (padded; {real_tokens / t_step:.0f} real), "
             f"{n_groups / t_step:.2f} pairs/s; model FLOPs/step (jrm-plan's count) {model_flops / 1e12:.3f} TFLOP")
    rep.note(f"jrm-plan ({gpu_key} preset, 60% compute efficiency assumed): {pred['step_s'] * 1e3:.1f} ms/step, "
             f"{pred['tokens_per_s']:.0f} tokens/s, MFU {100 * pred['mfu']:.1f}%")
    rep.result("joint_step_tokens_per_s_vs_plan", tok_s, pred["tokens_per_s"], "tokens/s", True,
               note=f"{layers} layers, {B}x{T} tokens, bf16, SDPA, torch AdamW; baseline = jrm-plan prediction")
    if peak:
        mfu = model_flops / (t_step * peak * 1e12)
        rep.result("joint_step_mfu_vs_plan", mfu, pred["mfu"], "fraction of bf16 peak", True,
                   note=f"peak {peak:g} TFLOP/s assumed; baseline = jrm-plan prediction")
    if mem is not None:
        # plan's model states assume DeepSpeed mixed precision (fp32 master + Adam: 12 B/param); this plain
        # bf16 AdamW keeps 4 B/param of states: compare like with like
        trainable = pred["trainable_b"] * 1e9
        plan_like = (pred["params_gib"] + pred["grads_gib"] + pred["activations_gib"] + pred["loss_buffer_gib"]) * GIB \
            + 4 * trainable
        rep.result("joint_step_peak_mem_vs_plan", peak_alloc / GIB, plan_like / GIB, "GiB", False,
                   note="baseline = jrm-plan params+grads+activations+loss buffer + 4 B/param bf16 AdamW states")

    # gradient checkpointing (the 7B recipe's setting), as engine.py enables it, vs jrm-plan with it on
    if budget.left() < 45:
        rep.skip("gradient checkpointing", "time budget")
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with guarded(rep, "step with gradient checkpointing"):
            train_step(batch)
            timed = []
            mem_gc = peak_extra_bytes(lambda: timed.append(time_fn(lambda: train_step(batch), dev, step_budget,
                                                                   min_reps=1 if cpu else 3, max_reps=10,
                                                                   warm=False)), dev)
            pred_gc = jplan.plan_for(plan_cfg(True), arch, w, cluster, "fused", 0.1, 3.0, 0.6)
            rep.result("joint_step_grad_ckpt_tokens_per_s_vs_plan", B * T / timed[0], pred_gc["tokens_per_s"],
                       "tokens/s", True, note=f"gradient checkpointing on; without it {tok_s:.0f} tokens/s measured")
            if mem_gc is not None and mem is not None:
                rep.result("joint_step_grad_ckpt_vs_off_peak_mem_extra", mem_gc / GIB, mem / GIB, "GiB", False,
                           note="peak allocated above params + optimizer states, checkpointing on vs off")
        backbone.gradient_checkpointing_disable()
        opt.zero_grad(set_to_none=True)

    # attention variants: torch SDPA restricted to one backend (flash-attn 2 / memory-efficient / cuDNN kernels)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION))
    for label, backend in backends[:1] if cpu else backends:  # CPU has a flash kernel only
        if budget.left() < 45:
            rep.skip(f"attention {label}", "time budget")
            continue
        try:
            with sdpa_kernel([backend]):
                t = time_fn(lambda: train_step(batch), dev, 2.0, min_reps=1 if cpu else 3, max_reps=5)
            rep.result(f"joint_step_{label}_vs_sdpa_auto", B * T / t, tok_s, "tokens/s", True,
                       note="torch SDPA restricted to one backend; baseline = SDPA's own choice")
        except Exception as e:  # a backend that rejects the mask / dtype is a finding, not a kit failure
            rep.skip(f"attention {label}", f"{type(e).__name__}: {str(e)[:160]}")
            opt.zero_grad(set_to_none=True)
    for impl, mod, supported in (("flash_attention_2", "flash_attn", "_supports_flash_attn"),
                                 ("flex_attention", None, "_supports_flex_attn")):
        if not getattr(type(backbone), supported, False):
            rep.skip(f"attention {impl}", f"transformers' {type(backbone).__name__} has {supported}=False")
            continue
        if mod:
            try:
                __import__(mod)
            except ImportError:
                rep.skip(f"attention {impl}", f"{mod} not importable (no wheel on PyPI; build it for this CUDA)")
                continue
        if dev.type != "cuda" or budget.left() < 60:
            rep.skip(f"attention {impl}", "needs CUDA" if dev.type != "cuda" else "time budget")
            continue
        try:
            backbone.set_attn_implementation(impl)
            t = time_fn(lambda: train_step(batch), dev, 2.0, max_reps=5)
            rep.result(f"joint_step_{impl}_vs_sdpa", B * T / t, tok_s, "tokens/s", True)
        except Exception as e:
            rep.error(f"step attention {impl}", e)
        finally:
            backbone.set_attn_implementation("sdpa")

    # packed vs unpacked
    packed_collator = None
    if has_packing:
        try:
            from jrm_dist.data.packing import PackedCollator as packed_collator
        except ImportError as e:
            rep.skip("packed vs unpacked", f"data.packing exists but jrm_dist.data.packing.PackedCollator does not ({e})")
    else:
        rep.skip("packed vs unpacked", "jrm_dist.config.DataConfig has no `packing` field in this tree")
    if packed_collator is not None:
        if budget.left() < 45:
            rep.skip("packed vs unpacked", "time budget")
        else:
            with guarded(rep, "step packed"):
                packed = to_dev(packed_collator(processor)(groups))
                train_step(packed)
                t_p = time_fn(lambda: train_step(packed), dev, step_budget, min_reps=1 if cpu else 3, max_reps=10)
                rep.result("joint_step_packed_vs_unpacked_pairs_per_s", n_groups / t_p, n_groups / t_step,
                           "pairs/s", True, note=f"packed rows {tuple(packed['input_ids'].shape)} vs unpacked {(B, T)}")


# ------------------------------------------------------------------------------------------------------- main
def _header(dev: torch.device, cpu: bool) -> list[str]:
    from importlib import metadata

    def ver(p):
        try:
            return metadata.version(p)
        except metadata.PackageNotFoundError:
            return "absent"

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        device = f"{p.name}, {p.total_memory / GIB:.0f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), Triton interpreter"
    pk = ", ".join(f"{p} {ver(p)}" for p in ("torch", "triton", "transformers", "liger-kernel", "flash-attn",
                                              "deepspeed", "webdataset", "mlflow"))
    return ["# GPU acceptance report (bench/gpu_check.py)", "",
            f"- mode: {'--cpu (tiny shapes, TRITON_INTERPRET=1)' if cpu else 'GPU'}",
            f"- device: {device}",
            f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, git {commit}, "
            f"Python {platform.python_version()}",
            f"- packages: {pk}"] + (
        ["- **--cpu**: the code paths of the GPU run at toy sizes; its timings measure the Triton interpreter and "
         "are not performance figures"] if cpu else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on CPU, Triton kernels interpreted")
    ap.add_argument("--out", default=str(BENCH / "REPORT_GPU.md"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new work after this many seconds")
    ap.add_argument("--only", nargs="*", choices=("kernels", "speed", "step"), help="run only these sections")
    ap.add_argument("--layers", type=int, default=4, help="text decoder layers of the 7B-width model")
    ap.add_argument("--vision-depth", type=int, default=4, help="vision blocks of the 7B-width model")
    ap.add_argument("--groups", type=int, default=4, help="groups (pairs) per micro-batch in the step")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (default: by device name)")
    args = ap.parse_args(argv)

    if args.cpu:
        dev = torch.device("cpu")
        torch.set_num_threads(1)  # a shared machine: OpenMP spin-waits cost more than they gain
    elif torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        print("gpu_check: no CUDA device; run with --cpu for the CPU mode", file=sys.stderr)
        return 2
    try:
        import jrm_kernels  # noqa: F401
    except ImportError as e:
        print(f"gpu_check: cannot import jrm_kernels ({e}): install the project (pip install -e .) or put a "
              "`jrm_kernels` link to kernels/ on PYTHONPATH (bench/gpu_run.sh does)", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    rep = Report(Path(args.out), _header(dev, args.cpu))
    sections = (("1. Kernels: Triton vs torch references", "kernels", lambda: section_kernels(rep, dev, args.cpu,
                                                                                             budget)),
                ("2. Speed and memory of the losses", "speed", lambda: section_speed(rep, dev, args.cpu, budget)),
                ("3. Joint training step (bf16, 7B width, few layers)", "step",
                 lambda: section_step(rep, dev, args.cpu, budget, args)))
    for title, key, fn in sections:
        if args.only and key not in args.only:
            continue
        rep.section(title)
        if budget.left() < 30:
            rep.skip(key, f"time budget ({args.budget_s:.0f} s) spent")
            continue
        t0 = time.time()
        try:
            fn()
        except Exception as e:
            rep.error(key, e)
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rep.note(f"({key}: {time.time() - t0:.1f} s)")
    rep.section("Imports")
    leaked = sorted(m for m in ("deepspeed", "webdataset", "mlflow") if m in sys.modules)
    rep.check("no_deepspeed_webdataset_mlflow_imported", not leaked,
              f"imported: {', '.join(leaked)}" if leaked else "none of deepspeed, webdataset, mlflow was imported")
    rep.finished = True
    rep.write()
    print(f"\ngpu_check: {rep.passed} checks passed, {rep.failed} failed, {len(rep.errors)} section error(s), "
          f"{len(rep.skipped)} skipped; report {rep.path}", flush=True)
    return 0 if rep.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
