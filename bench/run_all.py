"""`make bench`: run every bench in bench/ and write one report (bench/REPORT.md).

    python bench/run_all.py [--only NAME ...] [--timeout S] [--out bench/REPORT.md] [--no-plan-validation]

Each ``bench/bench_*.py`` (and ``bench/validate_plan.py``) runs in its own process from the repository root,
its output streamed through. A bench reports by printing lines

    RESULT {"name": "...", "ours": 1.23, "baseline": 4.56, "ratio": 0.27, "unit": "s/step", ...}

(bench/README.md). The report tabulates every RESULT line, lists any bench that failed or printed none (with
the tail of its output), adds jrm-plan's 7B/72B predictions and records the machine and package versions.
Exit status 1 when a bench failed or printed no RESULT, after the report is written.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
REQUIRED = ("name", "ours", "baseline", "ratio", "unit")
PACKAGES = ("torch", "deepspeed", "transformers", "triton", "bitsandbytes", "webdataset", "mlflow", "liger-kernel",
            "datasets", "numpy", "jrm-dist")
PLANS = [  # (label, config, nodes, gpu)
    ("Qwen2.5-VL-7B", "configs/qwen2_5_vl_7b.yaml", 1, "h200"),
    ("Qwen2.5-VL-7B", "configs/qwen2_5_vl_7b.yaml", 1, "h100"),
    ("Qwen2.5-VL-72B", "configs/qwen2_5_vl_72b.yaml", 4, "h200"),
    ("Qwen2.5-VL-72B", "configs/qwen2_5_vl_72b.yaml", 4, "h100"),
]
TAIL = 40


def parse_results(lines: list[str], bench: str) -> tuple[list[dict], list[str]]:
    """RESULT lines → dicts; malformed ones → problems (named by bench and line)."""
    results, problems = [], []
    for i, line in enumerate(lines, 1):
        if not line.startswith("RESULT "):
            continue
        try:
            r = json.loads(line[len("RESULT "):])
        except json.JSONDecodeError as e:
            problems.append(f"{bench}: output line {i}: RESULT is not JSON ({e})")
            continue
        missing = [k for k in REQUIRED if k not in r] if isinstance(r, dict) else list(REQUIRED)
        if missing:
            problems.append(f"{bench}: output line {i}: RESULT lacks {', '.join(missing)}")
            continue
        r["bench"] = bench
        results.append(r)
    return results, problems


def run_bench(path: Path, timeout: float) -> dict:
    """Run one bench, echo its output, keep all lines (RESULTs) and the tail."""
    print(f"\n===== {path.name} =====", flush=True)
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=TAIL)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)  # a bench that hangs silently is stopped too
    timer.start()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            print(line, flush=True)
            if line.startswith("RESULT "):
                lines.append(line)
            tail.append(line)
        rc = proc.wait()
    finally:
        timer.cancel()
    timed_out = killed.is_set()
    results, problems = parse_results(lines, path.name)
    status = "timeout" if timed_out else ("ok" if rc == 0 and results else ("no RESULT" if rc == 0 else f"exit {rc}"))
    return {"bench": path.name, "status": status, "seconds": time.time() - t0, "results": results,
            "problems": problems, "tail": list(tail)}


def machine() -> dict:
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": len(os.sched_getaffinity(0))}
    try:
        cpu = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
        info["cpu"] = cpu.split(":", 1)[1].strip()
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        info["memory_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        import torch

        info["accelerator"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    except ImportError:
        info["accelerator"] = "unknown"
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or "n/a"
    except (OSError, subprocess.TimeoutExpired):
        info["git"] = "n/a"
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    info["versions"] = versions
    return info


def planner_rows() -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from jrm_dist.plan import build_parser, run

    rows = []
    for label, config, nodes, gpu in PLANS:
        args = build_parser().parse_args(["--config", str(ROOT / config), "--nodes", str(nodes), "--gpus-per-node",
                                          "8", "--gpu", gpu])
        p, _ = run(args)
        rows.append({**p, "model": label, "cluster_label": f"{nodes}x8 {gpu.upper()}"})
    return rows


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


KEEP = "<!-- make bench keeps everything below this line: sections other commands wrote -->"


def render(runs: list[dict], plans: list[dict], info: dict) -> str:
    out = ["# jrm-dist performance report", "",
           f"Generated by `make bench` (bench/run_all.py) on {info['date']}. Ratios are ours / baseline measured "
           "in the same run on the same machine; see each bench's `unit` and `higher_is_better`.", "",
           "## Machine", "",
           f"* CPU: {info.get('cpu', '?')} — {info['cpus']} usable cores, {info.get('memory_gib', '?')} GiB RAM; "
           f"accelerator: {info.get('accelerator')}",
           f"* {info['platform']}, Python {info['python']}, git {info['git']}",
           "* " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()), "",
           "## Benchmarks: ours vs baseline", "",
           "| bench | measurement | ours | baseline | unit | ratio ours/baseline | better |", "|---|---|---:|---:|---|---:|---|"]
    for run in runs:
        for r in run["results"]:
            if r["name"].startswith("plan/"):
                continue
            hib = r.get("higher_is_better")
            better = "–" if hib is None else ("higher" if hib else "lower")
            out.append(f"| {run['bench']} | {r['name']} | {_num(r['ours'])} | {_num(r['baseline'])} | {r['unit']} | "
                       f"{_num(r['ratio'])} | {better} |")
    plan_checks = [r for run in runs for r in run["results"] if r["name"].startswith("plan/")]
    if plan_checks:
        ok = sum(1 for r in plan_checks if abs(r["ratio"] - 1) <= 0.15)
        out += ["", "## Planner validation (bench/validate_plan.py)", "",
                f"{ok}/{len(plan_checks)} checks within 15%. ours = jrm-plan, baseline = measured (per-rank tensors of a "
                "2-rank ZeRO-3 run, autograd-saved activations) or DeepSpeed's estimator.", "",
                "| check | planner | measured / DeepSpeed | unit | ratio |", "|---|---:|---:|---|---:|"]
        for r in plan_checks:
            out.append(f"| {r['name'].removeprefix('plan/')} | {r['ours']:.3f} | {r['baseline']:.3f} | {r['unit']} | "
                       f"{r['ratio']:.3f} |")
    out += ["", "## jrm-plan predictions (per GPU, the shipped configs)", "",
            "| model | cluster | micro-batch (groups) | params (B) | model states GiB | activations GiB | LM-loss GiB | "
            "total GiB | max micro-batch | step s | seq/s | MFU |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in plans:
        out.append(f"| {p['model']} | {p['cluster_label']} | {p['micro_batch']} | {p['params_b']:.2f} | "
                   f"{p['model_states_gib']:.1f} | {p['activations_gib']:.1f} | {p['loss_buffer_gib']:.2f} | "
                   f"{p['total_gib']:.1f} | {p['max_micro_batch']} | {p['step_s']:.2f} | {p['sequences_per_s']:.1f} | "
                   f"{100 * p['mfu']:.0f}% |")
    out.append("\nAssumptions: bf16, ZeRO-3, gradient checkpointing, fused LM CE, 2 candidates x 2 images x 256 "
               "tokens, 2048-token sequences, compute at 60% of the dense bf16 peak; formulas in jrm_dist/plan.py.")
    bad = [r for r in runs if r["status"] != "ok" or r["problems"]]
    out += ["", "## Runs", "", "| bench | status | seconds | RESULT lines |", "|---|---|---:|---:|"]
    out += [f"| {r['bench']} | {r['status']} | {r['seconds']:.0f} | {len(r['results'])} |" for r in runs]
    for r in bad:
        out += ["", f"### {r['bench']}: {r['status']}", ""]
        out += [f"* {p}" for p in r["problems"]]
        out += ["", "Last lines of its output:", "", "```", *r["tail"], "```"]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="bench file names (e.g. bench_train.py)")
    ap.add_argument("--timeout", type=float, default=float(os.environ.get("BENCH_TIMEOUT", 1800)),
                    help="seconds per bench (default 1800 or $BENCH_TIMEOUT)")
    ap.add_argument("--out", default=str(BENCH / "REPORT.md"))
    ap.add_argument("--no-plan-validation", action="store_true", help="skip bench/validate_plan.py")
    ap.add_argument("--bench-dir", default=str(BENCH), help=argparse.SUPPRESS)  # tests
    a = ap.parse_args(argv)
    bench_dir = Path(a.bench_dir)
    benches = sorted(bench_dir.glob("bench_*.py"))
    if not a.no_plan_validation and (bench_dir / "validate_plan.py").exists():
        benches.append(bench_dir / "validate_plan.py")
    if a.only:
        unknown = set(a.only) - {b.name for b in benches}
        if unknown:
            print(f"run_all: no such bench: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        benches = [b for b in benches if b.name in a.only]
    runs = [run_bench(b, a.timeout) for b in benches]
    info = machine()
    plans = planner_rows()
    report = render(runs, plans, info)
    old = Path(a.out).read_text() if Path(a.out).exists() else ""
    if KEEP in old:  # sections other commands write (make rehearse-7b, make repro-*) survive a re-run
        report = report.rstrip() + "\n\n" + old[old.index(KEEP):]
    Path(a.out).write_text(report)
    print(f"\n{report}\nreport written to {a.out}")
    bad = [r["bench"] for r in runs if r["status"] != "ok" or r["problems"]]
    if bad:
        print(f"run_all: {len(bad)} bench(es) failed or printed no valid RESULT line: {', '.join(bad)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
