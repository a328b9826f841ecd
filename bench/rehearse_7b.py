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


@contextmanager
def rss_monitor(path: Path):
    p = subprocess.Popen([PY, str(ROOT / "bench" / "rss_monitor.py"), "--out", str(path), "--every", "0.5"], cwd=ROOT)
    try:
        yield
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)


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
    return {"loaded": loaded, "step_times": steps, "ckpts": ckpts}


# ----------------------------------------------------------------------------------------------- serving

def serve_latency(export: Path, log: Path, n: int = 3) -> dict:
    """Start jrm-serve on the export and time ``n`` ``/v1/reward`` and ``n`` ``/v1/compare`` requests, one at a
    time, each on images it has not seen (the server answers a repeated input from its cache)."""
    import io

    import httpx
    from PIL import Image

    from data_prep.synthetic import make_group

    def b64(data: bytes) -> str:  # re-encoded as PNG, as a client would send it
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    items = []
    for i in range(2 * n):
        rec, imgs = make_group(2, i)
        items.append(({"instruction": rec["instruction"], "source_images": [b64(imgs[s]) for s in rec["source_images"]]},
                      [b64(imgs[c["images"][0]]) for c in rec["candidates"]]))
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
            time.sleep(1)
        ready = time.time() - t0
        reward, compare, p_ab = [], [], []
        for item, cands in items[:n]:
            t = time.time()
            r = httpx.post(f"{url}/v1/reward", json={"items": [dict(item, image=cands[0])]}, timeout=600)
            r.raise_for_status()
            reward.append(time.time() - t)
        for item, cands in items[n:]:
            t = time.time()
            r = httpx.post(f"{url}/v1/compare", json={"pairs": [dict(item, a={"image": cands[0]},
                                                                     b={"image": cands[1]})]}, timeout=600)
            r.raise_for_status()
            compare.append(time.time() - t)
            p_ab.append(r.json()["comparisons"][0]["p_a_beats_b"])
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


class State(dict):
    """Results of finished stages in <work>/state.json: a re-run after a failure resumes at the first
    unfinished stage (delete the file, or the stage's key, to redo one)."""

    def __init__(self, path: Path):
        super().__init__(json.loads(path.read_text()) if path.exists() else {})
        self.path = path

    def put(self, key: str, value) -> None:
        self[key] = value
        self.path.write_text(json.dumps(self, indent=1, default=str))


@contextmanager
def stage(st: State, key: str):
    """Run the body unless ``key`` is done; record its wall-clock span (plus what the body adds)."""
    if key in st:
        say(f"{key}: done in an earlier run, skipped")
        yield None
        return
    out: dict = {}
    t0 = time.time()
    yield out
    st.put(key, {"span": [t0, time.time()], **out})


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
    st = State(work / "state.json")
    if "started" not in st:
        st.put("started", time.strftime("%Y-%m-%d %H:%M"))
    model = (a.model or work / "qwen7b").resolve()
    shards, groups, export = work / "shards", work / "heldout", work / "export"
    with rss_monitor(rss):
        # 1. the checkpoint and the data
        with stage(st, "checkpoint") as r:
            if r is not None:
                if not (model / "model.safetensors.index.json").exists():
                    sh([PY, "-m", "jrm_dist.random_checkpoint", "--config", "7b", "--out", str(model)],
                       log=logs / "checkpoint.log")
                    r["written"] = True
                r["gb"] = du(model)
        with stage(st, "data") as r:
            if r is not None:
                sh([PY, "-m", "data_prep.cli", "synthetic", "--out", str(shards), "--groups", "32", "--seed", "0",
                    "--quiet", "--overwrite"], log=logs / "prep.log")
                sh([PY, str(ROOT / "bench" / "score_check.py"), "groups", str(groups), "--n", str(a.groups)])
        # 2. the plan
        with stage(st, "plan") as r:
            if r is not None:
                plan_args = [PY, "-m", "jrm_dist.plan", "--config", "configs/qwen2_5_vl_7b.yaml", "--model-config",
                             str(model), "--nodes", "2", "--gpus-per-node", "1", "--micro-batch", "1", "--json",
                             *[o for o in train_overrides(a, model, shards, work / "A")
                               if not o.startswith("data.train")]]
                for label, extra in (("this run (LoRA, params on disk)", []),
                                     ("LoRA, params in memory", ["zero.offload_param=none"]),
                                     ("full fine-tuning, params in memory", ["zero.offload_param=none",
                                                                             "model.lora.r=0"])):
                    out = subprocess.run(plan_args + extra, cwd=ROOT, capture_output=True, text=True, check=True)
                    r[label] = json.loads(out.stdout)
        # 3. Slurm: uninterrupted run A, then run B requeued after its first checkpoint
        sh(["bash", ".ci/slurm_setup.sh"], log=logs / "slurm_setup.log")
        for name in ("A", "B"):
            with stage(st, f"run_{name}") as r:
                if r is not None:
                    r.update(train_run(a, name, model, shards, work, logs))
        # 4. export, scoring, eval, serving
        ckpt_dir = max((work / "A" / "checkpoints").glob("step_*[0-9]"), key=lambda p: int(p.name.split("_")[1]))
        with stage(st, "export") as r:
            if r is not None:
                sh([PY, "-m", "jrm_dist.export", "--checkpoint", str(ckpt_dir), "--out", str(export), "--dtype",
                    "bf16"], log=logs / "export.log")
                r["gb"], r["checkpoint_gb"] = du(export), du(ckpt_dir)
        for mode in ("plain", "jrm"):
            with stage(st, f"score_{mode}") as r:
                if r is not None:
                    sh([PY, str(ROOT / "bench" / "score_check.py"), mode, str(export), str(groups),
                        str(work / f"scores_{mode}.json")], log=logs / f"score_{mode}.log")
        with stage(st, "eval") as r:
            if r is not None:
                bench_data = work / "editscore"
                shutil.rmtree(bench_data, ignore_errors=True)
                sys.path.insert(0, str(ROOT / "tests"))
                from bench_releases import write_editscore_release

                gs = json.loads((groups / "groups.json").read_text())
                write_editscore_release(bench_data, [
                    ([f"{g['key']}-a", f"{g['key']}-b"], g["instruction"], (groups / g["sources"][0]).read_bytes(),
                     [(groups / c).read_bytes() for c in g["candidates"][:2]], "color_alter", "overall") for g in gs])
                sh([PY, "-m", "jrm_dist.eval.cli", "editscore", "--model", str(export), "--data", str(bench_data),
                    "--out", str(work / "eval" / "editscore.json"), "--dtype", "bfloat16"], log=logs / "eval.log")
        with stage(st, "serve") as r:
            if r is not None:
                r.update(serve_latency(export, logs / "serve.log"))
    section = render(st, a, rss, work)
    print(section)
    if not a.no_report:
        write_report(section)
        say(f"wrote the section of {REPORT.relative_to(ROOT)}")
    return 0


def train_run(a, name: str, model: Path, shards: Path, work: Path, logs: Path) -> dict:
    out = work / name
    for d in (out, Path(f"{out}-swap")):
        shutil.rmtree(d, ignore_errors=True)
    log = logs / f"train_{name}.out"
    log.unlink(missing_ok=True)
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
    shutil.rmtree(Path(f"{out}-swap"), ignore_errors=True)  # 16.6 GB of parameter partitions per run
    return {"job": job, "requeued_at": requeued, **train_phases(log.read_text(errors="replace")),
            "records": steps_of(out)}


def _mem(pk: dict) -> str:
    return ", ".join(f"rank {r}: {v['rss']:.2f} ({v['anon']:.2f})" if r != "-" else f"{v['rss']:.2f} ({v['anon']:.2f})"
                     for (_, r), v in sorted(pk.items())) or "-"


def render(st: State, a, rss: Path, work: Path) -> str:
    """The REPORT.md section, from the stages' results and the RSS samples."""
    sys.path.insert(0, str(ROOT / "bench"))
    from rss_monitor import load, peaks

    samples = load(rss)
    A, B = st["run_A"], st["run_B"]
    lines = [
        "## Real-size rehearsal: Qwen2.5-VL-7B on this CPU machine (`make rehearse-7b`)", "",
        f"Run {st['started']} on 2 CPU cores / 24 GiB: 2 emulated Slurm nodes with one CPU rank each "
        f"(`sbatch launchers/train_7b.sh`), bf16, ZeRO-3 with the parameter partitions on disk "
        f"(`zero.offload_param=nvme`, {a.buffer_count} buffers of {a.buffer_size / 1e6:.0f} M elements, reuse "
        f"distance and prefetch 0), gradient checkpointing, LoRA r16 on q/k/v/o + reward head, alpha 0.3, one "
        f"group of 2 small images per rank and step, {a.steps} steps, a checkpoint every {a.save_every}.", "",
        "| phase | wall time | peak RSS (anonymous) per process, GB |", "|---|---:|---|"]
    rows = []
    if st["checkpoint"].get("written"):
        t0, t1 = st["checkpoint"]["span"]
        rows.append(("write the random 7B checkpoint (`jrm-make-checkpoint`)", t1 - t0,
                     peaks(samples, t0, t1, "jrm_dist.random_checkpoint")))
    for name, run in (("A", A), ("B", B)):
        t0, t1 = run["span"]
        loads = run["loaded"]
        rows.append((f"run {name}: sbatch to model loaded (partitions written to disk)", loads[0] - t0,
                     peaks(samples, t0, loads[0], "jrm_dist.train")))
        steps_end = run["ckpts"][-1][0] if run["ckpts"] else t1
        if name == "A":
            rows.append((f"run A: {a.steps} steps + {len(run['ckpts'])} checkpoints", steps_end - loads[0],
                         peaks(samples, loads[0], steps_end, "jrm_dist.train")))
        else:
            rq = run["requeued_at"]
            rows.append(("run B: requeue to resumed (Slurm's requeue delay, reload, checkpoint load)",
                         loads[-1] - rq, peaks(samples, rq, loads[-1], "jrm_dist.train")))
            rows.append((f"run B: steps {a.save_every + 1}-{a.steps} after the resume", steps_end - loads[-1],
                         peaks(samples, loads[-1], steps_end, "jrm_dist.train")))
    for key, label, module in (("export", "`jrm-export` (bf16, streamed)", "jrm_dist.export"),
                               ("score_plain", "plain transformers scoring", "score_check.py"),
                               ("score_jrm", "`JointRewardModel.score`", "score_check.py"),
                               ("eval", "`jrm-eval editscore`", "jrm_dist.eval.cli"),
                               ("serve", "`jrm-serve` start + requests", "jrm_dist.serve.server")):
        t0, t1 = st[key]["span"]
        rows.append((label, t1 - t0, peaks(samples, t0, t1, module)))
    for name, secs, pk in rows:
        lines.append(f"| {name} | {secs:.0f} s | {_mem(pk)} |")
    step_times = [t1 - t0 for t0, t1 in zip([A["loaded"][0]] + A["step_times"][:-1], A["step_times"])]
    lines += ["", "Run A's step times: " + ", ".join(f"{x:.0f} s" for x in step_times) + " (each step swaps every "
              "partition in for the forward, again for the recomputation and the backward); checkpoint saves: "
              + ", ".join(f"{x:.1f} s" for _, x in A["ckpts"]) + f". A checkpoint is {st['export']['checkpoint_gb']:.3f} "
              f"GB on disk (LoRA adapters, reward head and their optimizer state; the frozen base is re-read from "
              f"`model.name`). The base checkpoint is {st['checkpoint']['gb']:.2f} GB, the bf16 export "
              f"{st['export']['gb']:.2f} GB.", "",
              "`jrm-plan` for this setup, per rank in GiB (it plans GPU memory: here its terms are host memory, its "
              "3 GiB CUDA reserve is left out, and the NVMe swap buffers are its host-memory line):", "",
              "| setup | model states | ZeRO buffers | activations + LM-loss buffer | NVMe swap buffers | total |",
              "|---|---:|---:|---:|---:|---:|"]
    for label, p in st["plan"].items():
        if label == "span":
            continue
        act = p["activations_gib"] + p["loss_buffer_gib"]
        host = p.get("nvme_buffers_gib_per_node", 0.0)  # one rank per node here
        lines.append(f"| {label} | {p['model_states_gib']:.2f} | {p['zero_buffers_gib']:.2f} | {act:.2f} | "
                     f"{host:.2f} | {p['total_gib'] - p['reserved_gib'] + host:.2f} |")
    ra, rb = A["records"], B["records"]
    keys = ("loss/total", "loss/rank", "loss/lm", "grad_norm")
    resumed = [s for s in sorted(ra, key=int) if int(s) > a.save_every]
    same = all(ra[s][k] == rb[s][k] for s in resumed for k in keys)
    lines += ["", f"Resume: run B was requeued with `scontrol requeue` after its step-{a.save_every} checkpoint and "
              f"resumed from it; its steps {', '.join(resumed)} vs run A's: "
              + ("bitwise equal in loss, rank loss, LM loss and grad norm "
                 f"(step {resumed[-1]}: loss {ra[resumed[-1]]['loss/total']!r})." if same else
                 "; ".join(f"step {s}: " + ", ".join(f"{k} {ra[s][k]!r} vs {rb[s][k]!r}" for k in keys)
                           for s in resumed))]
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{work / 'B' / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("rehearse-7b").experiment_id])
        hist = client.get_metric_history(runs[0].info.run_id, "loss/total")
        lines.append(f"MLflow: {len(runs)} run for run B, `loss/total` logged at steps {sorted(m.step for m in hist)}.")
    except Exception as e:  # reported, not fatal
        lines.append(f"MLflow: could not be read ({e}).")
    sp, sj = (json.loads((work / f"scores_{m}.json").read_text()) for m in ("plain", "jrm"))
    from score_check import compare

    c = compare(sp, sj)
    per = lambda sc: sum(x["s"] for x in sc[1:]) / (len(sc) - 1)  # noqa: E731
    lines += ["", f"Scoring {c['inputs']} held-out candidates (synthetic groups of another seed) on the bf16 export: "
              f"plain transformers running the README's block vs `JointRewardModel.score` (jrm-eval's scorer): "
              + ("identical mu and sigma on every candidate" if c["identical"] else
                 f"max |mu difference| {c['max_abs_mu_diff']:.3g}, max relative sigma difference "
                 f"{c['max_rel_sigma_diff']:.3g}") + f" (mu spread across candidates {c['mu_spread']:.3g}); "
              f"{per(sp):.1f} s and {per(sj):.1f} s per candidate."]
    sv = st["serve"]
    lines += [f"`jrm-serve --dtype bfloat16`: ready in {sv['ready_s']:.0f} s; `/v1/reward` (one candidate) "
              + ", ".join(f"{x:.1f}" for x in sv["reward_s"]) + " s; `/v1/compare` (one pair, two candidates) "
              + ", ".join(f"{x:.1f}" for x in sv["compare_s"]) + " s; one request at a time, each on new images "
              "(the first request also pays the first forward's set-up)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
