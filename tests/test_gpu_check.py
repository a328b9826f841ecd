"""bench/gpu_check.py (the GPU acceptance kit) in its --cpu mode, so the kit cannot rot between GPU slots.

Each run is a fresh process: the kit sets TRITON_INTERPRET=1 before torch/triton are imported.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from run_all import parse_results  # noqa: E402  the RESULT parser `make bench` uses

KIT = ROOT / "bench" / "gpu_check.py"


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.mark.launch  # the whole kit, its joint training step included
def test_cpu_mode_runs_every_section_and_writes_the_report(tmp_path):
    out = tmp_path / "REPORT_GPU.md"
    res = subprocess.run([sys.executable, str(KIT), "--cpu", "--out", str(out)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    results, problems = parse_results(res.stdout.splitlines(), "gpu_check.py")
    assert not problems, problems
    names = {r["name"] for r in results}
    for want in ("rank_fwd_bwd_thurstone_vs_mc1000", "rank_fwd_bwd_bt_expected_vs_mc1000",
                 "ce_fused_vs_full_logits_time", "ce_fused_vs_masked_ref_time", "joint_step_tokens_per_s_vs_plan",
                 "joint_step_grad_ckpt_tokens_per_s_vs_plan", "joint_step_sdpa_flash_vs_sdpa_auto"):
        assert want in names, (want, sorted(names))
    checks = [ln for ln in res.stdout.splitlines() if ln.startswith("CHECK ")]
    for group in ("rank_fp32_grid", "rank_fp32_extremes", "rank_bf16_grid", "ce_fp32_grid", "ce_bf16_grid",
                  "ce_real_width", "ce_fused_loss_matches_at_bench_size", "step_losses_finite",
                  "no_deepspeed_webdataset_mlflow_imported"):
        line = next((ln for ln in checks if f" {group}:" in ln), None)
        assert line is not None and line.startswith("CHECK ok"), (group, checks)
    text = out.read_text()
    assert "**Status**: complete" in text
    assert re.search(r"checks (\d+) passed, 0 failed; 0 section error\(s\)", text), text[:2000]
    assert int(re.search(r"checks (\d+) passed", text).group(1)) == len(checks)
    for title in ("## 1. Kernels", "## 2. Speed", "## 3. Joint training step", "RESULT `joint_step_tokens_per_s"):
        assert title in text
    assert "Traceback" not in log


@pytest.mark.launch  # the kit's kernels and speed sections, under the Triton interpreter
def test_failing_checks_and_raising_groups_fail_the_process(tmp_path):
    """A wrong reference (masked LM loss off by 1%) fails its checks; a reference that raises (rank loss in bf16)
    is recorded as an error while the later groups still run; both are in the report, and the exit status is 1."""
    out = tmp_path / "REPORT_GPU.md"
    code = textwrap.dedent(f"""
        import runpy, sys, torch
        import jrm_dist.losses as L
        orig_ce, orig_rank = L.masked_lm_loss, L.gaussian_rank_loss
        L.masked_lm_loss = lambda *a, **k: orig_ce(*a, **k) * 1.01

        def rank(mu, *a, **k):
            if mu.dtype == torch.bfloat16:
                raise RuntimeError("injected: no bf16 kernel")
            return orig_rank(mu, *a, **k)
        L.gaussian_rank_loss = rank
        sys.argv = [{str(KIT)!r}, "--cpu", "--only", "kernels", "speed", "--out", {str(out)!r}]
        runpy.run_path({str(KIT)!r}, run_name="__main__")
    """)
    env = dict(_env(), TRITON_INTERPRET="1")  # this driver imports torch before the kit can set it
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ERROR in rank_bf16_grid" in res.stdout and "injected: no bf16 kernel" in res.stdout
    assert "CHECK ok   rank_fp32_grid" in res.stdout  # the groups before it ran
    assert "CHECK FAIL ce_fp32_grid" in res.stdout  # and those after it
    assert "CHECK FAIL ce_fused_loss_matches_at_bench_size" in res.stdout
    text = out.read_text()
    assert "**FAIL** `ce_fused_loss_matches_at_bench_size`" in text and "**ERROR** in rank_bf16_grid" in text
    assert "**Status**: complete" in text and "1 section error(s)" in text


def test_no_gpu_without_cpu_flag_is_a_usage_error(tmp_path):
    code = ("import sys, runpy, torch; torch.cuda.is_available = lambda: False; "
            f"sys.argv = [{str(KIT)!r}, '--out', {str(tmp_path / 'r.md')!r}]; "
            f"runpy.run_path({str(KIT)!r}, run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "--cpu" in res.stderr, res.stderr[-2000:]


def test_slot_scripts_pass_shellcheck_and_reject_bad_arguments():
    import shutil

    scripts = ["bench/gpu_run.sh", "bench/wheelhouse.sh"]
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", *scripts], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    elif os.environ.get("JRM_REQUIRE_SLURM") == "1":  # CI installs shellcheck with Slurm (.ci/slurm_setup.sh)
        pytest.fail("shellcheck is not installed")
    for args, msg in ((["3.12", "everything"], "expected kit, suite or full"), (["python3.12"], "expected e.g. 3.12")):
        r = subprocess.run(["bash", "bench/wheelhouse.sh", *args], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, WHEELHOUSE=os.devnull + "-unused"))
        assert r.returncode == 2 and msg in r.stderr, r.stderr
