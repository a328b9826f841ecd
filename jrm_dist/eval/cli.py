"""``jrm-eval``: score a JRM checkpoint on a benchmark's released files, or analyse its features.

    jrm-eval editscore --model HF_DIR --data EditReward-Bench/ --out results/editscore.json
    jrm-eval tiger     --model HF_DIR --data EditReward-Bench-TIGER/ --out results/tiger.json
    jrm-eval mmrb2     --model HF_DIR --data MMRB2/ --out results/mmrb2.json
    jrm-eval rescore   --results results/editscore.json          # protocol again from saved scores
    jrm-eval rank      --model JRM_DIR --model RANKONLY_DIR --shards data/shards --out results/rank

Where humans preferred one of two scored candidates, the results also hold the calibration of the
model's P(A beats B) (log-likelihood, Brier, ECE, selective accuracy; human ties left out) under the
rank mode the checkpoint was trained with (``--rank-mode`` overrides), and a reliability diagram PNG
next to the results JSON. See docs/calibration.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jrm_dist.eval import editscore, mmrb2, tiger
from jrm_dist.eval.common import (BenchmarkFormatError, EvalResult, Scorer, flatten_metrics, log_to_mlflow, rank_model,
                                  write_results)
from jrm_dist.losses import RANK_MODES

BENCHES = {
    "editscore": (editscore.EditScoreBench, editscore.rescore_records),
    "tiger": (tiger.TigerBench, tiger.rescore_records),
    "mmrb2": (mmrb2.MMRB2Bench, mmrb2.rescore_records),
}
RESCORE = {cls.name: fn for cls, fn in BENCHES.values()}


def _scoring_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8, help="candidates per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-pixels", type=int, default=None, help="cap on image pixels fed to the model")
    p.add_argument("--attn-implementation", default="auto")
    _rank_mode_arg(p)


def _rank_mode_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank-mode", default=None, choices=RANK_MODES,
                   help="how P(A beats B) is computed for calibration (default: the loss.rank_mode the checkpoint "
                        "records in jrm_config.json, else thurstone)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a JRM checkpoint folder (jrm-export output)")
    p.add_argument("--data", required=True, help="local copy of the benchmark release")
    p.add_argument("--out", required=True, help="results JSON (a .md table is written next to it)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows (smoke runs)")
    p.add_argument("--mlflow-run-id", default=None, help="log metrics + result files to this MLflow run")
    _scoring_args(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jrm-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("editscore", help="EditReward-Bench, EditScore release (datasets.save_to_disk folder)")
    _common(p)
    p.add_argument("--split", default=None, help="split name when the folder is a DatasetDict")
    p = sub.add_parser("tiger", help="EditReward-Bench, TIGER release (parquet in 2pair/ 3pair/ 4pair/)")
    _common(p)
    p.add_argument("--subsets", default=",".join(tiger.SUBSETS))
    p = sub.add_parser("mmrb2", help="Multimodal RewardBench 2 (parquet per config)")
    _common(p)
    p.add_argument("--subsets", default=",".join(mmrb2.SUBSETS))
    p = sub.add_parser("rescore", help="recompute metrics and table from a results JSON's per-record scores")
    p.add_argument("--results", required=True)
    p.add_argument("--out", default=None, help="write the recomputed results here (default: print only)")
    _rank_mode_arg(p)
    p = sub.add_parser("rank", help="effective rank of reward-token features over shard(s), spectrum PNG")
    p.add_argument("--model", action="append", required=True, help="checkpoint; repeat to compare")
    p.add_argument("--label", action="append", default=None, help="display name per --model")
    p.add_argument("--shards", required=True, help="manifest.json, folder with one, or brace pattern of tars")
    p.add_argument("--out", required=True, help="output folder (rank.json, rank.md, spectrum.png)")
    p.add_argument("--max-groups", type=int, default=None)
    p.add_argument("--center", action="store_true", help="centre features before the SVD")
    p.add_argument("--rank-by", default="overall", help="score dimension that ranks a group without an explicit "
                                                        "ranking (as data.rank_by in training)")
    p.add_argument("--mlflow-run-id", default=None)
    _scoring_args(p)
    return ap


def _scorer_kw(a) -> dict:
    return {"batch_size": a.batch_size, "device": a.device, "dtype": a.dtype, "max_pixels": a.max_pixels,
            "attn_implementation": a.attn_implementation}


def run_benchmark(a) -> EvalResult:
    cls, _ = BENCHES[a.cmd]
    kw = {"limit": a.limit}
    if a.cmd == "editscore":
        kw["split"] = a.split
    else:
        kw["subsets"] = [s.strip() for s in a.subsets.split(",") if s.strip()]
    bench = cls(a.data, **kw)  # read + validate the release before loading the model
    items = bench.items()
    rank = rank_model(a.model, a.rank_mode)
    scorer = Scorer(a.model, **_scorer_kw(a))
    result = bench.evaluate(scorer.score_items(items, desc=a.cmd), rank)
    json_path, md_path = write_results(a.out, result.payload(model=str(a.model), data=str(a.data), rank=rank),
                                       result.table)
    files = [json_path, md_path]
    png = reliability_png(result, json_path, f"{a.cmd}: {Path(a.model).name}")
    if png is not None:
        files.append(png)
    if a.mlflow_run_id:
        log_to_mlflow(a.mlflow_run_id, flatten_metrics(result.metrics, prefix=f"eval/{a.cmd}"), files)
    return result


def reliability_png(result: EvalResult, json_path: Path, title: str) -> Path | None:
    """``<results>.reliability.png`` next to the results JSON (None when there is nothing to draw)."""
    from jrm_dist.metrics import reliability_diagram

    if result.calibration_pairs is None:
        return None
    p, y = result.calibration_pairs
    mode = result.metrics.get("calibration", {}).get("rank_mode", "")
    return reliability_diagram(p, y, Path(json_path).with_suffix(".reliability.png"), title=f"{title} ({mode})")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.cmd in BENCHES:
            res = run_benchmark(a)
            print(res.table)
            print(f"results: {a.out}")
        elif a.cmd == "rescore":
            payload = json.loads(Path(a.results).read_text())
            fn = RESCORE.get(payload.get("benchmark"))
            if fn is None:
                raise BenchmarkFormatError(f"{a.results}: field 'benchmark' is {payload.get('benchmark')!r}, "
                                           f"expected one of {sorted(RESCORE)}")
            rank = dict(payload.get("rank") or {"rank_mode": "thurstone", "tie_margin": 0.0, "source": "default"})
            if a.rank_mode:
                rank.update(rank_mode=a.rank_mode, source="flag")
            res = fn(payload["records"], rank)
            res.scores = payload.get("scores", {})
            print(res.table)
            if a.out:
                extra = {k: payload[k] for k in ("model", "data") if k in payload}
                json_path, _ = write_results(a.out, res.payload(**extra, rank=rank, rescored_from=str(a.results)),
                                             res.table)
                reliability_png(res, json_path, f"{payload.get('benchmark')} (rescored)")
        elif a.cmd == "rank":
            from jrm_dist.eval.rank import run_rank

            payload = run_rank(a.model, a.label, a.shards, a.out, a.max_groups, a.center, rank_mode=a.rank_mode,
                               rank_by=a.rank_by, **_scorer_kw(a))
            print(payload["table"])
            if a.mlflow_run_id:
                metrics = {}
                for r in payload["models"]:
                    metrics[f"eval/rank/{r['label']}/effective_rank"] = r["effective_rank"]
                    metrics.update(flatten_metrics({k: v for k, v in r["calibration"].items() if k != "bins"},
                                                   prefix=f"eval/rank/{r['label']}"))
                out = Path(a.out)
                log_to_mlflow(a.mlflow_run_id, metrics, [out / "rank.json", out / "rank.md", out / "spectrum.png",
                                                         *(r["reliability_plot"] for r in payload["models"])])
    except (BenchmarkFormatError, FileNotFoundError) as e:
        print(f"jrm-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
