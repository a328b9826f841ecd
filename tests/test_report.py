"""jrm-report: MLflow runs (logged by our tracker and jrm-eval's logger into a temp SQLite store, and one
real tiny training run) → the paper's tables; the reproduction configs load."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jrm_dist.config import load_config
from jrm_dist.report import gather, main, render

ROOT = Path(__file__).resolve().parents[1]


def _log_run(uri: str, out_dir: Path, name: str, alpha: float, metrics: dict, eval_trees: dict, status="FINISHED"):
    """A run as the stack writes one: params + eval metrics through the trainer's tracker, benchmark metrics
    through jrm-eval's ``log_to_mlflow(flatten_metrics(...))``."""
    from jrm_dist.eval.common import flatten_metrics, log_to_mlflow
    from jrm_dist.tracking import MlflowTracker

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"loss.alpha={alpha}", f"train.output_dir={out_dir / name}",
                                                       "model.name=Qwen/Qwen2.5-VL-7B-Instruct"])
    tr = MlflowTracker(uri, "jrm-test", str(out_dir / name), name)
    tr.start()
    tr.log_params(cfg.flat())
    tr.log_metrics(metrics, step=10)
    run_id = tr.wait_run_id(30)
    tr.close(timeout=30, status=status)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # jrm-eval's logger follows MLflow's own resolution
    try:
        for bench, tree in eval_trees.items():
            log_to_mlflow(run_id, flatten_metrics(tree, prefix=f"eval/{bench}"), [])
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    return run_id


def _editscore_tree(pf, cons, overall):
    return {"average": {"prompt_following": pf, "consistency": cons, "overall": overall},
            "groups": {"prompt_following": {"object": pf}}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    _log_run(uri, d, "jrm_a0.3", 0.3, {"eval/accuracy": 0.81, "eval/effective_rank": 90.0},
             {"editscore": _editscore_tree(0.80, 0.70, 0.851),
              "mmrb2": {"overall": {"accuracy": 0.693}, "subsets": {"edit": {"accuracy": 0.7}}},
              "tiger": {"overall": {"group_accuracy": 0.5}}})
    _log_run(uri, d, "jrm_a0.1", 0.1, {"eval/accuracy": 0.80, "eval/effective_rank": 70.0},
             {"editscore": _editscore_tree(0.78, 0.69, 0.84)})
    _log_run(uri, d, "rank_only", 0.0, {"eval/accuracy": 0.78, "eval/effective_rank": 45.0}, {})
    _log_run(uri, d, "still_running", 0.5, {"eval/accuracy": 0.99}, {}, status="")  # not FINISHED
    return uri


def test_gather_reads_params_and_metrics_of_finished_runs(store):
    rows = gather(store, ["jrm-test"])
    assert [r.name for r in rows] == ["rank_only", "jrm_a0.1", "jrm_a0.3"]  # sorted by alpha; running excluded
    top = rows[-1]
    assert top.alpha == 0.3 and top.backbone == "Qwen/Qwen2.5-VL-7B-Instruct" and top.rank_mode == "thurstone"
    m = top.metrics
    assert (m["pf"], m["cons"], m["overall"], m["mmrb2"], m["tiger"]) == (0.80, 0.70, 0.851, 0.693, 0.5)
    assert m["mmrb2_edit"] == 0.7 and m["mmrb2_t2i"] is None
    assert (m["eff_rank"], m["heldout_acc"]) == (90.0, 0.81)
    assert rows[0].metrics["overall"] is None  # the rank-only run has no benchmark metrics: None, not 0
    assert len(gather(store, ["jrm-test"], all_statuses=True)) == 4


def test_render_builds_the_paper_tables(store):
    md = render(gather(store, ["jrm-test"]))
    main_row = next(ln for ln in md.splitlines() if ln.startswith("| jrm_a0.3 |"))
    cells = [c.strip() for c in main_row.strip("|").split("|")]
    assert cells[4:8] == ["80.0", "70.0", "85.1", "69.3"]  # PF, Cons., Overall, MMRB2
    rank_only = next(ln for ln in md.splitlines() if ln.startswith("| rank_only |"))
    assert "0 (rank-only)" in rank_only and "| – |" in rank_only
    sweep = md.split("## Alpha sweep")[1].split("##")[0]
    assert sweep.index("| 0 (rank-only) |") < sweep.index("| 0.1 |") < sweep.index("| 0.3 |")
    # effective rank: the best JRM run on Overall (alpha 0.3: 90) vs rank-only (45) -> ratio 2.00
    eff = md.split("JRM vs rank-only")[1]
    assert "| jrm_a0.3 (0.3) | 90.00 | rank_only | 45.00 | 2.00 |" in eff


def test_cli_writes_markdown_and_rejects_unknown_experiment(store, tmp_path, capsys):
    out = tmp_path / "report.md"
    assert main(["--tracking-uri", store, "--experiment", "jrm-test", "--out", str(out)]) == 0
    assert "## Alpha sweep" in out.read_text()
    assert main(["--tracking-uri", store, "--experiment", "nope"]) == 2
    assert "experiment 'nope' not found" in capsys.readouterr().err


def test_repro_configs_load():
    for p in sorted((ROOT / "configs" / "repro").glob("*.yaml")):
        if p.name == "runs.yaml":
            continue
        cfg = load_config(p)
        assert cfg.tracking.experiment.startswith("jrm-repro-") and cfg.tracking.run_name == p.stem
        assert (cfg.loss.alpha == 0.0) == p.stem.startswith("rank_only")
    runs = yaml.safe_load((ROOT / "configs" / "repro" / "runs.yaml").read_text())["runs"]
    names = set()
    for r in runs:
        cfg = load_config(ROOT / r["config"], r["overrides"])
        names.add(r["name"])
        assert cfg.tracking.run_name == r["name"]
        assert Path(cfg.train.output_dir).name == r["name"]
    assert len(names) == len(runs)
    alphas = {load_config(ROOT / r["config"], r["overrides"]).loss.alpha for r in runs if "7b" in r["name"]}
    assert alphas == {0.0, 0.1, 0.3, 0.5, 0.7}


@pytest.mark.launch
def test_report_on_a_real_tiny_training_run(tiny_backbone, tmp_path):
    """jrm-train (1 process, ZeRO-3, tiny backbone, synthetic shards) → its MLflow DB → jrm-report."""
    from data_prep.cli import main as prep

    for split, n, seed in (("train", 16, 0), ("eval", 8, 1)):
        prep(["synthetic", "--out", str(tmp_path / split), "--groups", str(n), "--seed", str(seed), "--quiet"])
    run_dir = tmp_path / "run"
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29613", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-m", "jrm_dist.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                        f"model.name={tiny_backbone}", f"data.train_shards={tmp_path / 'train'}",
                        f"data.eval_shards={tmp_path / 'eval'}", f"train.output_dir={run_dir}", "train.max_steps=2",
                        "train.eval_every=0", "train.save_every=0", "tracking.run_name=tiny_jrm"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    rows = gather(uri, ["jrm-tiny"])
    assert [r.name for r in rows] == ["tiny_jrm"]
    r = rows[0]
    assert r.alpha == 0.3 and r.backbone == tiny_backbone
    assert 0.0 <= r.metrics["heldout_acc"] <= 1.0 and r.metrics["eff_rank"] >= 1.0
    md = render(rows)
    assert f"{r.metrics['eff_rank']:.2f}" in md and "tiny_jrm" in md


def test_make_bench_report_tabulates_results_and_shows_failures(tmp_path):
    """bench/run_all.py on a folder of three benches: one with RESULT lines, one without, one crashing."""
    (tmp_path / "bench_ok.py").write_text(
        'import json\nprint("ours 2.0 s vs baseline 8.0 s")\n'
        'print("RESULT " + json.dumps({"name": "step_time", "ours": 2.0, "baseline": 8.0, "ratio": 0.25, '
        '"unit": "s", "higher_is_better": False}))\n')
    (tmp_path / "bench_silent.py").write_text('print("a table without the RESULT line")\n')
    (tmp_path / "bench_crash.py").write_text('print("starting")\nraise SystemExit("boom: out of memory")\n')
    out = tmp_path / "REPORT.md"
    keep = "<!-- make bench keeps everything below this line: sections other commands wrote -->"
    out.write_text(f"# an older report\n\n| stale | row |\n\n{keep}\n\n## Rehearsal (written by another command)\n42 s\n")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--bench-dir", str(tmp_path),
                        "--out", str(out), "--timeout", "120"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1  # a bench failed / printed no RESULT, but the report is written
    md = out.read_text()
    assert "| bench_ok.py | step_time | 2 | 8 | s | 0.25 | lower |" in md
    assert "### bench_silent.py: no RESULT" in md and "a table without the RESULT line" in md
    assert "### bench_crash.py: exit 1" in md and "boom: out of memory" in md
    assert "Qwen2.5-VL-72B | 4x8 H200" in md and "torch" in md and "## Machine" in md
    assert "| stale | row |" not in md and md.endswith(f"{keep}\n\n## Rehearsal (written by another command)\n42 s\n")
