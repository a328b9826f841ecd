"""jrm-report: gather finished JRM runs from MLflow into the paper's tables.

    jrm-report [--tracking-uri URI] [--experiment NAME ...] [--out report.md] [--json] [--all-statuses]

Reads each run's params (``loss.alpha``, ``model.name``, ``loss.rank_mode`` — the trainer logs the resolved
config) and its latest metric values, under the names the stack logs them:

* trainer (jrm_dist/train.py): ``eval/accuracy`` (held-out pairwise), ``eval/effective_rank`` (reward-token
  features);
* jrm-eval (jrm_dist/eval, ``--mlflow-run-id``): EditReward-Bench ``eval/editscore/average/{prompt_following,
  consistency,overall}`` (the paper's PF / Cons. / Overall), ``eval/tiger/overall/group_accuracy``,
  MMRB2 ``eval/mmrb2/overall/accuracy`` and ``eval/mmrb2/subsets/<task>/accuracy``,
  ``eval/rank/<label>/effective_rank`` (used when the trainer's is absent and there is exactly one).

Tables: (1) benchmarks per run (EditReward-Bench PF / Cons. / Overall, MMRB2, TIGER, effective rank);
(2) the alpha sweep per backbone (alpha 0 = the rank-only baseline); (3) effective rank, JRM vs rank-only
(the paper: 91.77 vs 46.86). A metric a run lacks prints as "–", never as 0.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

EDIT = "eval/editscore/average/"
MMRB2 = "eval/mmrb2/overall/accuracy"
MMRB2_TASKS = ("t2i", "edit", "interleaved", "reasoning")
TIGER = "eval/tiger/overall/group_accuracy"
EFF_RANK = "eval/effective_rank"
HELDOUT = "eval/accuracy"
PAPER = {"editreward_overall": 0.851, "mmrb2": 0.693, "eff_rank_jrm": 91.77, "eff_rank_rank_only": 46.86}


class ReportError(ValueError):
    pass


@dataclass
class RunRow:
    run_id: str
    name: str
    experiment: str
    backbone: str
    alpha: float | None
    rank_mode: str
    status: str
    metrics: dict[str, float | None] = field(default_factory=dict)


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _effective_rank(m: dict[str, float]) -> float | None:
    if EFF_RANK in m:
        return _num(m[EFF_RANK])
    labelled = [v for k, v in m.items() if k.startswith("eval/rank/") and k.endswith("/effective_rank")]
    return _num(labelled[0]) if len(labelled) == 1 else None


def row_from_run(run, experiment: str) -> RunRow:
    p, m = run.data.params, run.data.metrics
    alpha = p.get("loss.alpha")
    metrics = {
        "pf": _num(m.get(EDIT + "prompt_following")), "cons": _num(m.get(EDIT + "consistency")),
        "overall": _num(m.get(EDIT + "overall")), "mmrb2": _num(m.get(MMRB2)), "tiger": _num(m.get(TIGER)),
        "eff_rank": _effective_rank(m), "heldout_acc": _num(m.get(HELDOUT)),
        **{f"mmrb2_{t}": _num(m.get(f"eval/mmrb2/subsets/{t}/accuracy")) for t in MMRB2_TASKS},
    }
    return RunRow(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8], experiment=experiment,
                  backbone=p.get("model.name", "?"), alpha=_num(alpha), rank_mode=p.get("loss.rank_mode", "?"),
                  status=run.info.status, metrics=metrics)


def gather(tracking_uri: str | None, experiments: list[str] | None, all_statuses: bool = False) -> list[RunRow]:
    """Runs of the named experiments (default: all), FINISHED only unless ``all_statuses``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if experiments:
        exps = []
        for name in experiments:
            e = client.get_experiment_by_name(name)
            if e is None:
                raise ReportError(f"experiment {name!r} not found at {client.tracking_uri}")
            exps.append(e)
    else:
        exps = client.search_experiments()
    rows = []
    for e in exps:
        flt = "" if all_statuses else "attributes.status = 'FINISHED'"
        token = None
        while True:
            page = client.search_runs([e.experiment_id], filter_string=flt, max_results=1000, page_token=token)
            rows += [row_from_run(r, e.name) for r in page]
            token = page.token
            if not token:
                break
    rows.sort(key=lambda r: (r.backbone, r.alpha if r.alpha is not None else -1.0, r.name))
    return rows


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _f(v: float | None, nd: int = 2) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _alpha(r: RunRow) -> str:
    if r.alpha is None:
        return "–"
    return f"{r.alpha:g}" + (" (rank-only)" if r.alpha == 0 else "")


def render(rows: list[RunRow]) -> str:
    if not rows:
        return "No finished runs found."
    out = ["## EditReward-Bench, MMRB2, TIGER (accuracy %) and effective rank", "",
           "| run | backbone | alpha | loss | PF | Cons. | Overall | MMRB2 | "
           + " | ".join(f"MMRB2 {t}" for t in MMRB2_TASKS) + " | TIGER | held-out acc | eff. rank |",
           "|---|---|---|---|" + "---:|" * (8 + len(MMRB2_TASKS))]
    for r in rows:
        m = r.metrics
        out.append(f"| {r.name} | {r.backbone} | {_alpha(r)} | {r.rank_mode} | {_pct(m['pf'])} | {_pct(m['cons'])} | "
                   f"{_pct(m['overall'])} | {_pct(m['mmrb2'])} | "
                   + " | ".join(_pct(m[f"mmrb2_{t}"]) for t in MMRB2_TASKS)
                   + f" | {_pct(m['tiger'])} | {_pct(m['heldout_acc'])} | {_f(m['eff_rank'])} |")
    out.append(f"\nPaper (JRM, Qwen2.5-VL): EditReward-Bench overall {100 * PAPER['editreward_overall']:.1f}, "
               f"MMRB2 {100 * PAPER['mmrb2']:.1f}.")
    by_bb: dict[str, list[RunRow]] = {}
    for r in rows:
        if r.alpha is not None:
            by_bb.setdefault(r.backbone, []).append(r)
    out += ["", "## Alpha sweep", "",
            "| backbone | alpha | run | held-out acc | Overall | MMRB2 | eff. rank |", "|---|---|---|---:|---:|---:|---:|"]
    for bb, rs in by_bb.items():
        for r in sorted(rs, key=lambda r: (r.alpha, r.name)):
            m = r.metrics
            out.append(f"| {bb} | {_alpha(r)} | {r.name} | {_pct(m['heldout_acc'])} | {_pct(m['overall'])} | "
                       f"{_pct(m['mmrb2'])} | {_f(m['eff_rank'])} |")
    out += ["", "## Effective rank of the reward features: JRM vs rank-only", "",
            "| backbone | JRM run (alpha) | JRM eff. rank | rank-only run | rank-only eff. rank | ratio |",
            "|---|---|---:|---|---:|---:|"]
    for bb, rs in by_bb.items():
        base = [r for r in rs if r.alpha == 0 and r.metrics["eff_rank"] is not None]
        jrm = [r for r in rs if r.alpha and r.metrics["eff_rank"] is not None]
        if not base or not jrm:
            out.append(f"| {bb} | {'–' if not jrm else jrm[0].name} | – | {'–' if not base else base[0].name} | – | – |")
            continue
        # the JRM run reported is the best on the main metric available (Overall, else held-out accuracy)
        key = "overall" if any(r.metrics["overall"] is not None for r in jrm) else "heldout_acc"
        best = max(jrm, key=lambda r: (r.metrics[key] is not None, r.metrics[key] or 0.0))
        b = max(base, key=lambda r: r.metrics["eff_rank"])
        out.append(f"| {bb} | {best.name} ({best.alpha:g}) | {best.metrics['eff_rank']:.2f} | {b.name} | "
                   f"{b.metrics['eff_rank']:.2f} | {best.metrics['eff_rank'] / b.metrics['eff_rank']:.2f} |")
    out.append(f"\nPaper: {PAPER['eff_rank_jrm']} vs {PAPER['eff_rank_rank_only']} "
               f"(ratio {PAPER['eff_rank_jrm'] / PAPER['eff_rank_rank_only']:.2f}).")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jrm-report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or MLflow's default")
    ap.add_argument("--experiment", action="append", default=None, help="repeat; default: every experiment")
    ap.add_argument("--all-statuses", action="store_true", help="include running/failed runs")
    ap.add_argument("--out", default=None, help="write the markdown here too")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of markdown")
    a = ap.parse_args(argv)
    try:
        rows = gather(a.tracking_uri, a.experiment, a.all_statuses)
    except ReportError as e:
        print(f"jrm-report: error: {e}", file=sys.stderr)
        return 2
    md = render(rows)
    print(json.dumps([asdict(r) for r in rows], indent=2) if a.json else md)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# JRM results\n\n" + md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
