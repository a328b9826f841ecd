"""``make rehearse-7b``: Qwen2.5-VL-7B end to end on this CPU machine, through the real launcher.

A random 7B checkpoint in the released layout (real tokenizer) is written, then ``sbatch
launchers/train_7b.sh`` trains it on the 2-node Slurm cluster of ``.ci/slurm_setup.sh`` (one CPU rank per
node, bf16, ZeRO-3 with the parameter partitions offloaded to disk, gradient checkpointing, LoRA r16 on
q/k/v/o plus the reward head, alpha 0.3), twice: once straight through and once requeued by Slurm after
its first checkpoint, and the resumed steps are compared with the uninterrupted ones. The checkpoint is
exported (streamed, bf16), scored by plain transformers (the README block) and by ``JointRewardModel``,
evaluated with ``jrm-eval`` and served with ``jrm-serve``. Peak RSS per phase comes from
bench/rss_monitor.py. Prints a summary and rewrites the "Real-size rehearsal" section of bench/REPORT.md.

    make rehearse-7b                       # REHEARSE_DIR=runs/rehearse-7b (~50 GB of disk at the peak)
    python bench/rehearse_7b.py --steps 4 --save-every 2 --work DIR [--keep-checkpoint]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
REPORT = ROOT / "bench" / "REPORT.md"
BEGIN, END = "<!-- rehearse-7b:begin -->", "<!-- rehearse-7b:end -->"


def say(msg: str) -> None:
    print(f"[rehearse-7b {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list[str], log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    say("$ " + " ".join(map(str, cmd)))
    if log is None:
        return subprocess.run(cmd, cwd=ROOT, check=True, **kw)
    with log.open("a") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, **kw)
    if p.returncode:
        raise SystemExit(f"{cmd[:3]} failed (exit {p.returncode}); its output: {log}")
    return p


class Phases:
    """Wall-clock phases, for the timing table and to cut the RSS samples."""

    def __init__(self):
        self.spans: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.spans[name] = [t0, time.time()]

    def mark(self, name: str, t0: float, t1: float) -> None:
        self.spans[name] = [t0, t1]


@contextmanager
def rss_monitor(path: Path):
    p = subprocess.Popen([PY, str(ROOT / "bench" / "rss_monitor.py"), "--out", str(path), "--every", "0.5"], cwd=ROOT)
    try:
        yield
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)


def peaks(samples: Path, t0: float, t1: float, module: str | None = None) -> dict[str, dict[str, float]]:
    """rank -> {"rss", "anon"} peak GB of the samples in [t0, t1] (of one module when given)."""
    out: dict[str, dict[str, float]] = {}
    if not samples.exists():
        return out
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        if not t0 <= s["t"] <= t1 or (module and s["module"] != module):
            continue
        r = out.setdefault(s["rank"], {"rss": 0.0, "anon": 0.0})
        r["rss"] = max(r["rss"], s["rss"] / 1e9)
        r["anon"] = max(r["anon"], s["anon"] / 1e9)
    return out


def log_times(text: str, pattern: str) -> list[float]:
    """Unix times of the log lines (``YYYY-mm-dd HH:MM:SS,mmm [rank0] ...``) matching ``pattern``."""
    out = []
    for m in re.finditer(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \[rank0\][^\n]*" + pattern, text, re.M):
        out.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000)
    return out


def du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def steps_of(out: Path) -> dict[int, dict]:
    recs = {}
    for ln in (out / "steps.jsonl").read_text().splitlines():
        if ln.strip():
            r = json.loads(ln)
            recs[r["step"]] = r
    return recs


# ----------------------------------------------------------------------------------------------- training

def train_overrides(a, model: Path, shards: Path, out: Path) -> list[str]:
    return [f"model.name={model}", "model.lora.r=16", "model.lora.dropout=0", "model.attn_implementation=sdpa",
            f"data.train_shards={shards}/manifest.json", "data.eval_shards=", "data.max_pixels=3136",
            "data.min_pixels=784", "data.max_length=512", "data.num_workers=0", "data.shuffle_buffer=8",
            "data.groups_per_batch=1", "train.grad_accum=1", "loss.alpha=0.3",
            "zero.offload_param=nvme", f"zero.nvme_path={out}-swap", f"zero.nvme_buffer_size={a.buffer_size}",
            f"zero.nvme_buffer_count={a.buffer_count}", "zero.stage3_max_reuse_distance=0",
            "zero.stage3_prefetch_bucket_size=0", "zero.stage3_max_live_parameters=100000000",
            f"train.output_dir={out}", f"train.max_steps={a.steps}", f"train.save_every={a.save_every}",
            "train.eval_every=0", "train.export=false", "tracking.experiment=rehearse-7b"]


def sbatch(a, model: Path, shards: Path, out: Path, log: Path) -> str:
    env = dict(os.environ, JRM_DEVICE="cpu", JRM_NPROC_PER_NODE="1", PATH=f"{Path(PY).parent}:{os.environ['PATH']}")
    cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}",
           "launchers/train_7b.sh", *train_overrides(a, model, shards, out)]
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout.strip()


def job_state(job: str) -> str:
    p = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    m = re.search(r"JobState=(\w+)", p.stdout)
    return m.group(1) if m else "GONE"


def wait_job(job: str, until=None, timeout: float = 3 * 3600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if until is not None and until():
            return
        st = job_state(job)
        if st in ("COMPLETED", "GONE"):
            return
        if st in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            raise SystemExit(f"job {job} ended {st}")
        time.sleep(5)
    raise SystemExit(f"job {job} still running after {timeout:.0f} s")


def train_phases(text: str) -> dict[str, float]:
    loaded = log_times(text, r"model: [\d.]+M parameters")
    steps = log_times(text, r"jrm_dist.train: step \d+/")
    ckpts = [(t, float(m)) for t, m in zip(log_times(text, r"jrm_dist.train: checkpoint "),
                                           re.findall(r"\[rank0\][^\n]*jrm_dist.train: checkpoint \S+ \(([\d.]+)s\)", text))]
    return {"loaded": loaded, "steps": steps, "ckpts": ckpts}


# ----------------------------------------------------------------------------------------------- serving

def serve_latency(export: Path, groups: Path, log: Path, n: int = 3) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("a") as f:
        p = subprocess.Popen([PY, "-m", "jrm_dist.serve.server", "--model", str(export), "--port", str(port),
                              "--dtype", "bfloat16", "--max-batch", "2"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    try:
        while True:
            if p.poll() is not None:
                raise SystemExit(f"jrm-serve exited {p.returncode}; its output: {log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        ready = time.time() - t0
        g = json.loads((groups / "groups.json").read_text())[0]
        b64 = lambda name: base64.b64encode((groups / name).read_bytes()).decode()  # noqa: E731
        item = {"instruction": g["instruction"], "source_images": [b64(s) for s in g["sources"]]}
        reward, compare = [], []
        for i in range(n):
            t = time.time()
            r = httpx.post(f"{url}/v1/reward", json={"items": [dict(item, image=b64(g["candidates"][i % 2]))]},
                           timeout=600)
            r.raise_for_status()
            reward.append(time.time() - t)
            t = time.time()
            r = httpx.post(f"{url}/v1/compare", json={"pairs": [dict(item, a={"image": b64(g["candidates"][0])},
                                                                     b={"image": b64(g["candidates"][1])})]},
                           timeout=600)
            r.raise_for_status()
            compare.append(time.time() - t)
            p_ab = r.json()["comparisons"][0]["p_a_beats_b"]
        return {"ready_s": ready, "reward_s": reward, "compare_s": compare, "p_a_beats_b": p_ab}
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


# ----------------------------------------------------------------------------------------------- report

def gb(x: float) -> str:
    return f"{x:.2f}"


def write_report(section: str) -> None:
    text = REPORT.read_text() if REPORT.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        text = text.split(BEGIN)[0] + block + text.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    REPORT.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("REHEARSE_DIR", ROOT / "runs" / "rehearse-7b")))
    ap.add_argument("--model", type=Path, help="an existing 7B folder (default: write one under --work)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--buffer-size", type=int, default=280_000_000, help="zero.nvme_buffer_size (elements)")
    ap.add_argument("--buffer-count", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4, help="held-out groups to score")
    ap.add_argument("--no-report", action="store_true", help="do not rewrite bench/REPORT.md")
    a = ap.parse_args(argv)
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    rss = work / "rss.jsonl"
    ph = Phases()
    res: dict = {"started": time.strftime("%Y-%m-%d %H:%M")}
    with rss_monitor(rss):
        # 1. the checkpoint
        model = (a.model or work / "qwen7b").resolve()
        if not (model / "model.safetensors.index.json").exists():
            with ph("write checkpoint"):
                sh([PY, "-m", "jrm_dist.random_checkpoint", "--config", "7b", "--out", str(model)],
                   log=logs / "checkpoint.log")
        res["checkpoint_gb"] = du(model)
        # 2. data
        shards = work / "shards"
        if not (shards / "manifest.json").exists():
            sh([PY, "-m", "data_prep.cli", "synthetic", "--out", str(shards), "--groups", "32", "--seed", "0",
                "--quiet"], log=logs / "prep.log")
        groups = work / "heldout"
        if not (groups / "groups.json").exists():
            sh([PY, str(ROOT / "bench" / "score_check.py"), "groups", str(groups), "--n", str(a.groups)])
        # 3. the plan
        plan_args = [PY, "-m", "jrm_dist.plan", "--config", "configs/qwen2_5_vl_7b.yaml", "--model-config",
                     str(model), "--nodes", "2", "--gpus-per-node", "1", "--micro-batch", "1", "--json",
                     *[o for o in train_overrides(a, model, shards, work / "A") if not o.startswith("data.train")]]
        plans = {}
        for label, extra in (("this run (LoRA, params on disk)", []),
                             ("LoRA, params in memory", ["zero.offload_param=none"]),
                             ("full fine-tuning, params in memory", ["zero.offload_param=none", "model.lora.r=0"])):
            out = subprocess.run(plan_args + extra, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            plans[label] = json.loads(out)
        res["plan"] = plans
        # 4. Slurm: uninterrupted run A, then run B requeued after its first checkpoint
        sh(["bash", ".ci/slurm_setup.sh"], log=logs / "slurm_setup.log")
        runs = {}
        for name in ("A", "B"):
            out = work / name
            for d in (out, Path(f"{out}-swap")):
                shutil.rmtree(d, ignore_errors=True)
            log = logs / f"train_{name}.out"
            log.unlink(missing_ok=True)
            t0 = time.time()
            job = sbatch(a, model, shards, out, log)
            requeued = None
            if name == "B":
                def saved() -> bool:
                    d = out / "checkpoints"
                    return d.exists() and any(re.fullmatch(r"step_\d+", p.name) and (p / "COMPLETE").exists()
                                              and int(p.name.split("_")[1]) >= a.save_every for p in d.iterdir())
                wait_job(job, until=saved)
                requeued = time.time()
                say(f"requeue of job {job} after its step-{a.save_every} checkpoint")
                sh(["scontrol", "requeue", job])
            wait_job(job, until=lambda: job_state(job) == "COMPLETED")
            while job_state(job) not in ("COMPLETED", "GONE"):
                time.sleep(5)
            t1 = time.time()
            shutil.rmtree(Path(f"{out}-swap"), ignore_errors=True)  # 16.6 GB of parameter partitions per run
            text = log.read_text(errors="replace")
            runs[name] = {"t0": t0, "t1": t1, "job": job, "requeued_at": requeued, **train_phases(text),
                          "steps": steps_of(out)}
            ph.mark(f"train {name}", t0, t1)
        # 5. resume check
        A, B = runs["A"]["steps"], runs["B"]["steps"]
        keys = ("loss/total", "loss/rank", "loss/lm", "grad_norm")
        res["resume"] = {s: {k: (A[s][k], B[s][k]) for k in keys} for s in sorted(A) if s > a.save_every}
        res["resume_bitwise"] = all(x == y for s in res["resume"].values() for x, y in s.values())
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=f"sqlite:///{work / 'B' / 'mlflow.db'}")
            exp = client.get_experiment_by_name("rehearse-7b")
            (run,) = client.search_runs([exp.experiment_id])
            hist = client.get_metric_history(run.info.run_id, "loss/total")
            res["mlflow_points"] = sorted(m.step for m in hist)
        except Exception as e:  # reported, not fatal: the numbers above stand on their own
            res["mlflow_points"] = f"unreadable: {e}"
        ckpt_dir = max((work / "A" / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        res["checkpoint_on_disk_gb"] = du(ckpt_dir)
        # 6. export, scoring, eval, serving
        export = work / "export"
        with ph("export"):
            sh([PY, "-m", "jrm_dist.export", "--checkpoint", str(ckpt_dir), "--out", str(export), "--dtype", "bf16"],
               log=logs / "export.log")
        res["export_gb"] = du(export)
        for mode in ("plain", "jrm"):
            with ph(f"score ({mode})"):
                sh([PY, str(ROOT / "bench" / "score_check.py"), mode, str(export), str(groups),
                    str(work / f"scores_{mode}.json")], log=logs / f"score_{mode}.log")
        cmp = subprocess.run([PY, str(ROOT / "bench" / "score_check.py"), "compare", str(work / "scores_plain.json"),
                              str(work / "scores_jrm.json")], cwd=ROOT, capture_output=True, text=True, check=True)
        res["score_compare"] = json.loads(cmp.stdout)
        res["score_times"] = {m: json.loads((work / f"scores_{m}.json").read_text()) for m in ("plain", "jrm")}
        bench_data = work / "editscore"
        if not bench_data.exists():
            sys.path.insert(0, str(ROOT / "tests"))
            from bench_releases import write_editscore_release

            gs = json.loads((groups / "groups.json").read_text())
            write_editscore_release(bench_data, [
                ([f"{g['key']}-a", f"{g['key']}-b"], g["instruction"], (groups / g["sources"][0]).read_bytes(),
                 [(groups / c).read_bytes() for c in g["candidates"][:2]], "color_alter", "overall") for g in gs])
        with ph("jrm-eval"):
            sh([PY, "-m", "jrm_dist.eval.cli", "editscore", "--model", str(export), "--data", str(bench_data),
                "--out", str(work / "eval" / "editscore.json"), "--dtype", "bfloat16"], log=logs / "eval.log")
        with ph("jrm-serve"):
            res["serve"] = serve_latency(export, groups, logs / "serve.log")
    # 7. summary
    res["phases"] = ph.spans
    res["runs"] = {k: {kk: vv for kk, vv in v.items() if kk != "steps"} for k, v in runs.items()}
    rows = []
    A = runs["A"]
    load_end = A["loaded"][0] if A["loaded"] else A["t0"]
    first_step = A["steps"][0] if A["steps"] else A["t1"]
    rows.append(("load (start to model built)", load_end - A["t0"], peaks(rss, A["t0"], load_end, "jrm_dist.train")))
    rows.append(("steps (incl. saves)", A["t1"] - load_end, peaks(rss, load_end, A["t1"], "jrm_dist.train")))
    for name in ("export", "score (plain)", "score (jrm)", "jrm-eval", "jrm-serve"):
        t0, t1 = ph.spans[name]
        rows.append((name, t1 - t0, peaks(rss, t0, t1)))
    res["rows"] = [(n, s, p) for n, s, p in rows]
    (work / "summary.json").write_text(json.dumps(res, indent=1, default=str))
    section = render(res, a, A, first_step, load_end)
    print(section)
    if not a.no_report:
        write_report(section)
        say(f"wrote the section of {REPORT.relative_to(ROOT)}")
    return 0


def render(res: dict, a, A: dict, first_step: float, load_end: float) -> str:
    step_times = [t1 - t0 for t0, t1 in zip([load_end] + A["steps"][:-1], A["steps"])]
    plan = res["plan"]
    lines = [
        "## Real-size rehearsal: Qwen2.5-VL-7B on this CPU machine (`make rehearse-7b`)", "",
        f"Run {res['started']} on 2 CPU cores / 24 GiB, 2 emulated Slurm nodes with one rank each: bf16, ZeRO-3 with "
        f"the parameter partitions on disk (`zero.offload_param=nvme`, {a.buffer_count} buffers of "
        f"{a.buffer_size / 1e6:.0f} M elements), gradient checkpointing, LoRA r16 on q/k/v/o + reward head, "
        f"alpha 0.3, one group of 2 small images per rank and step, {a.steps} steps, a checkpoint every "
        f"{a.save_every}.", "",
        "| phase | wall time | peak RSS per process (anonymous), GB |", "|---|---:|---|"]
    for name, secs, pk in res["rows"]:
        mem = ", ".join(f"rank {r}: {v['rss']:.2f} ({v['anon']:.2f})" for r, v in sorted(pk.items())) or "-"
        lines.append(f"| {name} | {secs:.0f} s | {mem} |")
    lines += ["", f"Step times (first includes the trace of ZeRO-3's first pass): "
              + ", ".join(f"{s:.0f} s" for s in step_times) + ".",
              "Checkpoint saves: " + ", ".join(f"{s:.1f} s" for _, s in A["ckpts"]) + "; a checkpoint is "
              f"{res['checkpoint_on_disk_gb']:.3f} GB on disk (trainable parameters + optimizer state; the frozen "
              f"base is re-read from `model.name`). The base checkpoint is {res['checkpoint_gb']:.2f} GB, the bf16 "
              f"export {res['export_gb']:.2f} GB.", "",
              "`jrm-plan` for the same setup (per rank, GiB; its GPU terms read as host memory here, and its "
              "3 GiB reserved for a CUDA context does not apply):", "",
              "| setup | model states | ZeRO buffers | activations + LM-loss buffer | NVMe swap buffers (host) "
              "| total without the CUDA reserve |", "|---|---:|---:|---:|---:|---:|"]
    for label, p in plan.items():
        act = p["activations_gib"] + p["loss_buffer_gib"]
        host = p.get("nvme_buffers_gib_per_node", 0.0) / 1  # one rank per node here
        lines.append(f"| {label} | {p['model_states_gib']:.2f} | {p['zero_buffers_gib']:.2f} | {act:.2f} | "
                     f"{host:.2f} | {p['total_gib'] - p['reserved_gib'] + host:.2f} |")
    r = res["resume"]
    lines += ["", f"Resume after `scontrol requeue` at the step-{a.save_every} checkpoint: steps "
              f"{', '.join(map(str, r))} of the requeued run vs the uninterrupted one: "
              + ("bitwise equal (loss, rank loss, LM loss, grad norm)." if res["resume_bitwise"] else
                 "; ".join(f"step {s}: " + ", ".join(f"{k} {x!r} vs {y!r}" for k, (x, y) in v.items())
                           for s, v in r.items())),
              f"MLflow steps of the requeued run's `loss/total`: {res['mlflow_points']}.", ""]
    c = res["score_compare"]
    lines += [f"Scoring {c['inputs']} held-out candidates in bf16: plain transformers (the README block) vs "
              f"`JointRewardModel.score`: max |mu difference| {c['max_abs_mu_diff']:.3g} (spread of mu "
              f"{c['mu_spread']:.3g}), max relative sigma difference {c['max_rel_sigma_diff']:.3g}"
              + (" (identical)." if c["identical"] else ".")]
    s = res["serve"]
    lines += [f"`jrm-serve` (bf16): ready in {s['ready_s']:.0f} s; `/v1/reward` one candidate "
              + ", ".join(f"{x:.1f}" for x in s["reward_s"]) + " s; `/v1/compare` one pair "
              + ", ".join(f"{x:.1f}" for x in s["compare_s"]) + " s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
