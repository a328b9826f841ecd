"""launchers/: shellcheck, defaults, preflight, the torchrun wrapper, and real sbatch runs on Slurm.

The Slurm tests need a running cluster (``.ci/slurm_setup.sh`` as root starts 2 emulated nodes on this
machine). Without one they are skipped locally; with ``JRM_REQUIRE_SLURM=1`` (CI) a missing cluster or
shellcheck is a failure. Jobs are watched with ``scontrol show job -o`` (no slurmdbd, so no sacct).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jrm_dist.config import load_config
from jrm_dist.train import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ROOT / "launchers"
SBATCH_SCRIPTS = ("train_72b.sh", "train_7b.sh", "tiny_cpu.sh")
REQUIRE = os.environ.get("JRM_REQUIRE_SLURM") == "1"


def _need(ok: bool, reason: str) -> None:
    """Skip locally, fail in CI (JRM_REQUIRE_SLURM=1)."""
    if ok:
        return
    if REQUIRE:
        pytest.fail(f"{reason} (JRM_REQUIRE_SLURM=1: CI must run this test)")
    pytest.skip(reason)


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(JRM_PYTHON=sys.executable, PYTHONWARNINGS="ignore", **extra)
    return env


def _overrides(backbone: str, shards: dict, out: Path, **extra) -> list[str]:
    ov = {"model.name": backbone, "data.train_shards": shards["train"], "data.eval_shards": shards["eval"],
          "train.output_dir": str(out), "train.eval_every": 0, "data.shuffle_buffer": 8}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


# ------------------------------------------------------------------------------------------ static checks

def test_shellcheck_every_launcher():
    _need(shutil.which("shellcheck") is not None, "shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(str(p.relative_to(ROOT)) for p in LAUNCHERS.glob("*.sh")) + [".ci/slurm_setup.sh"]
    assert {"launchers/common.sh", "launchers/train_local.sh"} <= set(scripts)
    assert all(f"launchers/{s}" in scripts for s in SBATCH_SCRIPTS)
    r = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _sbatch_options(text: str) -> dict[str, str]:
    opts = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            for tok in line.split()[1:]:
                k, _, v = tok.partition("=")
                opts[k] = v
    return opts


def _defaults(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(DEFAULT_[A-Z_]+)=(\S+)", text, flags=re.M))


@pytest.mark.parametrize("script", SBATCH_SCRIPTS)
def test_sbatch_headers_agree_with_defaults_and_config(script):
    """sbatch cannot read variables: the #SBATCH lines, DEFAULT_* and the config must not drift apart."""
    text = (LAUNCHERS / script).read_text()
    opts, d = _sbatch_options(text), _defaults(text)
    assert opts["--nodes"] == d["DEFAULT_NODES"]
    assert opts["--ntasks-per-node"] == "1"  # one torchrun per node
    assert re.fullmatch(r"B:USR1@\d+", opts["--signal"]), "the batch shell must get the signal (it forwards it)"
    assert "--requeue" in opts and opts["--open-mode"] == "append"
    if "DEFAULT_GPUS_PER_NODE" in d:
        assert opts["--gpus-per-node"] == d["DEFAULT_GPUS_PER_NODE"]
    config = re.search(r'JRM_CONFIG="\$\{JRM_CONFIG:-([^}]+)\}"', text).group(1)
    cfg = load_config(ROOT / config)
    assert int(d["DEFAULT_MICRO_BATCH"]) == cfg.data.groups_per_batch
    assert int(d["DEFAULT_GRAD_ACCUM"]) == cfg.train.grad_accum
    # the structure is shared, not copied: every sbatch script ends in the same common.sh entry
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "jrm_slurm_main " in code and "srun" not in code and "torchrun" not in code


def test_requeue_code_agrees_with_trainer():
    m = re.search(r"^JRM_REQUEUE_EXIT_CODE=(\d+)", (LAUNCHERS / "common.sh").read_text(), flags=re.M)
    assert int(m.group(1)) == REQUEUE_EXIT_CODE


def test_sbatch_script_outside_slurm_refuses():
    env = _env()
    for k in list(env):
        if k.startswith("SLURM_"):
            del env[k]
    r = subprocess.run(["bash", str(LAUNCHERS / "tiny_cpu.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "not inside a Slurm job" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------ preflight

class _Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def preflight(capsys, monkeypatch):
    """``jrm-preflight --config configs/tiny.yaml ARGS`` in this process (the CLI path runs in train_local)."""
    from jrm_dist.preflight import main

    monkeypatch.chdir(ROOT)

    def call(*args) -> _Ran:
        capsys.readouterr()
        code = main(["--config", str(ROOT / "configs/tiny.yaml"), *map(str, args)])
        got = capsys.readouterr()
        return _Ran(code, got.out, got.err)
    return call


def test_preflight_passes_and_prints_output_dir(preflight, tiny_backbone, synthetic_shards, tmp_path):
    out = tmp_path / "run"
    r = preflight(*_overrides(tiny_backbone, synthetic_shards, out), "--print-output-dir")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert "resume: no checkpoint yet" in r.stderr
    assert not out.exists()  # preflight has no side effects


def test_preflight_lists_every_problem(preflight, tiny_backbone, synthetic_shards, tmp_path):
    bad_shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards["train"], bad_shards)
    victim = sorted(bad_shards.glob("*.tar"))[0]
    victim.write_bytes(b"\x00garbage" * 100)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = preflight(f"model.name={tmp_path / 'no-model'}", f"data.train_shards={bad_shards}",
                   f"data.eval_shards={tmp_path / 'no-eval'}", f"train.output_dir={blocker / 'out'}")
    assert r.returncode == 2
    err = r.stderr
    assert f"shard {victim}: not a tar file" in err
    assert f"data.eval_shards='{tmp_path / 'no-eval'}': does not exist" in err
    assert f"model.name='{tmp_path / 'no-model'}': not a local directory" in err
    assert f"{blocker} is not a writable directory" in err
    assert "4 problem(s); nothing was launched" in err


def test_preflight_verify_checks_every_shard_sha256(preflight, tiny_backbone, synthetic_shards, tmp_path):
    """data.verify=true: a shard changed after jrm-prep (still a valid tar) fails preflight, naming it."""
    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards["train"], shards)
    ov = _overrides(tiny_backbone, synthetic_shards, tmp_path / "o", **{"data.train_shards": shards})
    assert preflight(*ov, "data.verify=true").returncode == 0
    victim = sorted(shards.glob("*.tar"))[1]
    with open(victim, "ab") as f:  # appended zero blocks: the tar still opens, the bytes changed
        f.write(b"\0" * 1024)
    assert preflight(*ov).returncode == 0  # without data.verify the damage goes unnoticed here
    r = preflight(*ov, "data.verify=true")
    assert r.returncode == 2 and f"shard {victim}: sha256" in r.stderr and "manifest says" in r.stderr, r.stderr


def test_preflight_config_model_and_disk(preflight, tiny_backbone, synthetic_shards, tmp_path):
    r = preflight(*_overrides(tiny_backbone, synthetic_shards, tmp_path / "o"), "train.no_such_key=1")
    assert r.returncode == 2 and "unknown config key 'train.no_such_key'" in r.stderr
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(Path(tiny_backbone) / "config.json", weightless)
    r = preflight(*_overrides(str(weightless), synthetic_shards, tmp_path / "o"))
    assert r.returncode == 2 and "lacks weights (*.safetensors), tokenizer" in r.stderr
    r = preflight(*_overrides(tiny_backbone, synthetic_shards, tmp_path / "o"), "--min-free-gb", "1e9")
    assert r.returncode == 2 and "needs" in r.stderr and "for --min-free-gb" in r.stderr
    r = preflight(*_overrides(tiny_backbone, synthetic_shards, tmp_path / "o"), "--device", "cuda", "--nproc", "64")
    assert r.returncode == 2 and "64 process(es) per node need 64 GPU(s)" in r.stderr


def test_preflight_refuses_an_output_dir_that_a_live_run_holds(preflight, tiny_backbone, synthetic_shards, tmp_path):
    """The launchers run preflight before any torchrun starts: a folder held by a live run fails there (issue 18
    §3); a lock file left by a dead run does not."""
    from jrm_dist.runguard import lock_output_dir

    fd = lock_output_dir(tmp_path / "o")  # this process plays the live run (flock: per open file)
    try:
        r = preflight(*_overrides(tiny_backbone, synthetic_shards, tmp_path / "o"))
        assert r.returncode == 2 and "is in use by a live jrm-train run" in r.stderr, r.stderr
        assert f'"pid": {os.getpid()}' in r.stderr
    finally:
        os.close(fd)
    assert preflight(*_overrides(tiny_backbone, synthetic_shards, tmp_path / "o")).returncode == 0


def test_preflight_estimates_72b_checkpoint_size(tmp_path):
    """72B under ZeRO-3 + AdamW: ~14 bytes/parameter per checkpoint (bf16 weights + fp32 master, m, v)."""
    from jrm_dist.preflight import checkpoint_bytes

    cfg = load_config(ROOT / "configs/qwen2_5_vl_72b.yaml")
    ckpt, export = checkpoint_bytes(cfg, None)
    params = export / 2
    assert 70e9 < params < 76e9
    assert ckpt == pytest.approx(14 * params, rel=1e-6)


@pytest.mark.launch
def test_train_local_stops_at_preflight(tiny_backbone, synthetic_shards, tmp_path):
    out = tmp_path / "run"
    ov = _overrides(tiny_backbone, synthetic_shards, out, **{"data.train_shards": tmp_path / "missing"})
    r = subprocess.run([str(LAUNCHERS / "train_local.sh"), *ov], cwd=ROOT, env=_env(JRM_NPROC_PER_NODE="2"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "preflight: FAIL data.train_shards" in r.stderr and "preflight failed" in r.stderr
    assert "[jrm-torchrun]" not in r.stderr and not out.exists()


# ------------------------------------------------------------------------------------------ torchrun wrapper

WORKER = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    flag = Path(sys.argv[1]) / f"ready{os.environ['RANK']}"
    delay = float(os.environ.get("EXIT_DELAY", "0"))  # e.g. rank 0 still flushing MLflow when others left
    if sys.argv[2] == "crash":
        sys.exit(3)
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    flag.write_text(str(os.getpid()))
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    sys.exit(75 if got else 9)
""")


def _wrapper(tmp_path, mode: str, launch=("--standalone", "--nproc_per_node=2"), **env) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, "-m", "jrm_dist.torchrun", *launch, "--monitor_interval=0.1",
                             str(script), str(tmp_path), mode],
                            cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_ready(procs, tmp_path, ranks) -> None:
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{r}").exists() for r in ranks):
        for p in procs:
            assert p.poll() is None, p.communicate()[0]
        assert time.time() < deadline, "workers did not start"
        time.sleep(0.1)


@pytest.mark.launch
def test_torchrun_wrapper_forwards_usr1_and_keeps_requeue_code(tmp_path):
    """SIGUSR1 to the agent reaches every worker (stock torchrun would die) and 75 comes out (not 1)."""
    p = _wrapper(tmp_path, "wait")
    try:
        _wait_ready([p], tmp_path, (0, 1))
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == REQUEUE_EXIT_CODE, out
    assert "exiting 75 for requeue" in out


@pytest.mark.launch
@pytest.mark.parametrize("delays", [("0", "3"), ("3", "0")], ids=["host-first", "host-last"])
def test_torchrun_wrapper_two_agents_c10d_all_exit_requeue_code(tmp_path, delays):
    """Two agents, c10d: one node's worker leaves 3 s after the other's (rank 0 flushing MLflow). The
    agents wait for each other and the host keeps the store up meanwhile, so both exit 75 by themselves."""
    from train_launch import free_port

    port = free_port()
    launch = lambda rank: ("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--node_rank={rank}",
                           f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=grace-test",
                           f"--rdzv_conf=is_host={int(rank == 0)}")
    host = _wrapper(tmp_path, "wait", launch(0), EXIT_DELAY=delays[0])
    other = _wrapper(tmp_path, "wait", launch(1), EXIT_DELAY=delays[1])
    try:
        _wait_ready([host, other], tmp_path, (0, 1))
        for p in (host, other):
            p.send_signal(signal.SIGUSR1)
        ended: dict[int, float] = {}
        deadline = time.time() + 90
        while len(ended) < 2 and time.time() < deadline:
            for i, p in enumerate((host, other)):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.time()
            time.sleep(0.05)
        outs = [p.communicate(timeout=30)[0] for p in (host, other)]
    finally:
        for p in (host, other):
            if p.poll() is None:
                p.kill()
    assert [host.returncode, other.returncode] == [REQUEUE_EXIT_CODE] * 2, "\n-----\n".join(outs)
    assert not any("RendezvousConnectionError" in o or "only 1 of 2" in o for o in outs), "\n-----\n".join(outs)
    # the agent whose worker was done first waited for the other (3 s later) before leaving
    assert abs(ended[0] - ended[1]) < 1.5, ended


@pytest.mark.launch
def test_torchrun_wrapper_reports_a_crash_as_failure(tmp_path):
    p = _wrapper(tmp_path, "crash")
    out, _ = p.communicate(timeout=90)
    assert p.returncode == 1, out
    assert re.search(r"exitcode\s*:\s*3\b", out), out


# ------------------------------------------------------------------------------------------ real Slurm

def _slurm_nodes() -> list[str]:
    if shutil.which("sbatch") is None:
        return []
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True)
    if r.returncode != 0:
        return []
    return sorted({ln.split()[0] for ln in r.stdout.splitlines()
                   if len(ln.split()) == 2 and ln.split()[1] in ("idle", "mixed", "allocated")})


@pytest.fixture(scope="module")
def slurm():
    nodes = _slurm_nodes()
    _need(shutil.which("sbatch") is not None, "Slurm is not installed: run .ci/slurm_setup.sh as root")
    _need(len(nodes) >= 2, f"Slurm cluster with >= 2 usable nodes not running (sinfo: {nodes}); "
                           "run .ci/slurm_setup.sh as root")
    return nodes


def job_info(jid: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)


def wait_for(jid: str, pred, timeout: float, log: Path, what: str) -> dict[str, str]:
    deadline = time.time() + timeout
    while True:
        info = job_info(jid)
        if pred(info):
            return info
        if time.time() > deadline:
            text = log.read_text() if log.exists() else "<no log>"
            pytest.fail(f"job {jid}: timed out waiting for {what}; state {info.get('JobState')} "
                        f"reason {info.get('Reason')}\n{text[-6000:]}")
        time.sleep(0.5)


def sbatch(script: str, overrides: list[str], log: Path, **env) -> str:
    r = subprocess.run(["sbatch", "--parsable", f"--output={log}", str(LAUNCHERS / script), *overrides],
                       cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


@pytest.fixture
def cleanup_jobs():
    jobs: list[str] = []
    yield jobs
    for jid in jobs:  # never leave a job of ours running or pending
        subprocess.run(["scancel", jid], capture_output=True)


@pytest.mark.launch
def test_sbatch_preflight_failure_fails_fast(slurm, tiny_backbone, synthetic_shards, tmp_path, cleanup_jobs):
    out, log = tmp_path / "run", tmp_path / "job.log"
    jid = sbatch("tiny_cpu.sh", _overrides(tiny_backbone, synthetic_shards, out,
                                           **{"model.name": tmp_path / "no-model"}), log)
    cleanup_jobs.append(jid)
    info = wait_for(jid, lambda i: i["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), 120, log, "the end")
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text
    assert "preflight: FAIL model.name" in text and "[jrm-torchrun]" not in text
    assert not out.exists()


@pytest.mark.launch
def test_sbatch_two_nodes_preempt_requeue_resume(slurm, tiny_backbone, synthetic_shards, tmp_path, cleanup_jobs):
    """tiny_cpu.sh on 2 nodes: SIGUSR1 to the batch shell mid-run -> checkpoint -> exit 75 -> scontrol requeue
    -> the second run resumes into the same MLflow run and completes with a checkpoint and an export."""
    steps = 20
    out, log = tmp_path / "run", tmp_path / "job.log"
    jid = sbatch("tiny_cpu.sh", _overrides(tiny_backbone, synthetic_shards, out, **{
        "train.max_steps": steps, "train.save_every": 8, "optim.warmup_ratio": 0.0}), log)
    cleanup_jobs.append(jid)

    steps_log = out / "steps.jsonl"
    deadline = time.time() + 300
    while not (steps_log.exists() and len(steps_log.read_text().splitlines()) >= 3):
        info = job_info(jid)
        if info["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job ended before it could be preempted: {info['JobState']}\n{log.read_text()[-6000:]}")
        if time.time() > deadline:
            pytest.fail(f"no training step after 300 s\n{log.read_text()[-6000:]}")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)

    # The requeued job waits for its BeginTime (Slurm delays a requeue by ~2 minutes): release it now.
    info = wait_for(jid, lambda i: int(i.get("Restarts", 0)) >= 1 and i["JobState"] == "PENDING"
                    or i["JobState"] in ("COMPLETED", "FAILED"), 240, log, "the requeue")
    assert info["JobState"] == "PENDING", f"not requeued: {info['JobState']}\n{log.read_text()[-6000:]}"
    # Only once the first run has left the nodes (no COMPLETING): starting the new run while the old
    # batch step is still being cleaned up gets it killed ("Job credential revoked").
    deadline = time.time() + 120
    while True:
        states = subprocess.run(["sinfo", "-h", "-N", "-n", ",".join(slurm[:2]), "-o", "%T"],
                                capture_output=True, text=True).stdout.split()
        if states and all(st == "idle" for st in states):
            break
        assert time.time() < deadline, f"nodes not idle after the requeue: {states}"
        time.sleep(0.5)
    # slurmd revokes the job's credentials at the requeue with a timestamp in whole seconds and refuses a
    # credential created in that same second ("Job credential revoked", seen in CI): release it later.
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=True)
    info = wait_for(jid, lambda i: i["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 400, log,
                    "completion")
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-6000:]
    assert info["Restarts"] == "1"

    # preemption path: the batch shell forwarded the signal, the trainer exited 75, the job requeued itself
    assert "batch shell got SIGUSR1" in text
    assert f"exiting {REQUEUE_EXIT_CODE} for requeue" in text
    assert f"requeueing job {jid} (restart 1" in text
    # every node's agent exited 75 itself (none died on a lost rendezvous store or was killed by srun)
    assert "training step ended with exit code 75" in text and "RendezvousConnectionError" not in text
    assert f"the trainer exited {REQUEUE_EXIT_CODE}: checkpoint written" in text
    assert f"job {jid} requeued" in text and "requeue failed" not in text
    # both nodes ran a torchrun agent in both runs, on their own node rank
    for node_rank, node in enumerate(slurm[:2]):
        assert len(re.findall(rf"\[jrm-torchrun\] {node}: node_rank {node_rank}, nnodes 2", text)) == 2, text
    # world size = nodes x procs, every rank reported
    ranks = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank_*.json"))]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [steps, steps]

    # resumed from the preemption checkpoint: every step exactly once across the two runs
    logged = [json.loads(ln)["step"] for ln in steps_log.read_text().splitlines()]
    assert logged == list(range(1, steps + 1)), logged
    first_run = text[:text.index(f"exiting {REQUEUE_EXIT_CODE} for requeue")]
    assert "received SIGUSR1: will checkpoint" in first_run
    stopped = int(re.findall(r"step (\d+)/%d " % steps, first_run)[-1])
    assert 3 <= stopped < steps and f"checkpoint {out}/checkpoints/step_{stopped:08d}" in first_run
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"step_{steps:08d}"
    export = out / "export"
    assert (export / "config.json").exists() and list(export.glob("*.safetensors"))

    # one MLflow run continued across the requeue, with the metrics of every step
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(load_config(ROOT / "configs/tiny.yaml").tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    loss_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss/total"))
    assert loss_steps == list(range(1, steps + 1))
    for key in ("alpha", "loss/rank", "loss/lm", "train/accuracy", "eval/effective_rank"):
        assert key in run.data.metrics, sorted(run.data.metrics)


@pytest.mark.launch
def test_requeue_by_hand_is_reported_as_a_requeue(slurm, tmp_path, cleanup_jobs):
    """`scontrol requeue JOB` by an operator: Slurm signals the batch shell (the trainer checkpoints and exits
    75), the launcher's own `scontrol requeue` then fails with "Job is pending execution" because the job is
    already requeued. The launcher must say the job was requeued, not "failed; resubmit"."""
    script, log = tmp_path / "job.sh", tmp_path / "job.log"
    script.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        #SBATCH --requeue
        #SBATCH --open-mode=append
        #SBATCH --time=00:05:00
        source {LAUNCHERS / 'common.sh'}
        echo "start restart=${{SLURM_RESTART_COUNT:-0}}"
        if [[ "${{SLURM_RESTART_COUNT:-0}}" == 0 ]]; then
            trap 'JRM_TRAPPED=1' TERM    # the forwarded signal: the trainer checkpoints and exits 75
            sleep 120 & wait
            JRM_STEP_RC=$JRM_REQUEUE_EXIT_CODE
            rc=0; jrm_maybe_requeue "" "$(mktemp)" || rc=$?
            echo "maybe_requeue=$rc"
        fi
        """))
    r = subprocess.run(["sbatch", "--parsable", f"--output={log}", str(script)], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip().split(";")[0]
    cleanup_jobs.append(jid)
    wait_for(jid, lambda i: log.exists() and "start restart=0" in log.read_text(), 120, log, "the start")
    subprocess.run(["scontrol", "requeue", jid], check=True)
    deadline = time.time() + 60
    while "maybe_requeue=" not in log.read_text():
        assert time.time() < deadline, log.read_text()
        time.sleep(0.2)
    text = log.read_text()
    assert "maybe_requeue=0" in text and f"job {jid} requeued" in text, text
    assert "requeue failed" not in text, text
    assert int(job_info(jid)["Restarts"]) == 1


def test_every_launcher_env_knob_is_documented():
    """Each environment variable a launcher reads appears in launchers/README.md's knob table, with
    JRM_DEVICE's CPU use spelled out (the sbatch GPU scripts default to cuda)."""
    internal = {"BASH_SOURCE", "PATH", "RUN", "VAR", "JRM_STEP_PID", "JRM_STEP_RC", "JRM_TRAPPED",
                "JRM_REQUEUE_EXIT_CODE", "PYTHONPATH"}
    read = set()
    for sh in LAUNCHERS.glob("*.sh"):
        text = sh.read_text()
        read |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", text)) | set(re.findall(r"jrm_default ([A-Z_]+)", text))
    knobs = {v for v in read - internal if not v.startswith(("DEFAULT_", "SLURM_"))}
    readme = (LAUNCHERS / "README.md").read_text()
    table = readme[readme.index("### Knobs"):]
    assert {"JRM_DEVICE", "JRM_CONFIG", "JRM_NPROC_PER_NODE", "DS_ACCELERATOR", "DEMO_DIR"} <= knobs
    missing = sorted(v for v in knobs if f"`{v}`" not in table)
    assert not missing, f"launcher env knobs missing from launchers/README.md: {missing}"
    assert "JRM_DEVICE=cpu" in table
