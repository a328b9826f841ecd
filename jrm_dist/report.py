"""jrm-report: gather finished JRM runs from MLflow into the paper's tables.

    jrm-report [--tracking-uri URI] [--experiment NAME ...] [--out report.md] [--json] [--all-statuses]
               [--sweep [--plots DIR]]

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


# The alpha sweep of `make repro-toy` (jrm_dist/repro.py logs these per run): (key, metric, label, percent?)
SWEEP_METRICS = (
    ("heldout_acc", HELDOUT, "accuracy (all)", True),
    ("acc_colour", "eval/accuracy/colour", "accuracy colour", True),
    ("acc_quality", "eval/accuracy/quality", "accuracy quality", True),
    ("eff_rank", EFF_RANK, "eff. rank", False),
    ("caption_kept", "eval/caption_colour_accuracy", "caption colour kept", True),
    ("log_likelihood", "eval/log_likelihood", "log-lik.", False),
    ("brier", "eval/brier", "Brier", False),
    ("ece", "eval/ece", "ECE", False),
    ("sel_acc_25", "eval/sel_acc_25", "sel. acc 25%", True),
    ("sel_acc_50", "eval/sel_acc_50", "sel. acc 50%", True),
)
# two-sided 97.5% quantiles of Student's t by degrees of freedom (beyond the table: the normal 1.96)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t_interval(values: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval over seeds, n); half-width NaN for n < 2."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), 1
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    df = n - 1
    t = _T975.get(df) or next((_T975[k] for k in sorted(_T975) if k >= df), 1.96)
    return mean, t * sd / math.sqrt(n), n


def sweep_summary(rows: list["RunRow"]) -> dict[float, dict[str, tuple[float, float, int]]]:
    """alpha → metric key → (mean, CI half-width, n seeds) over the runs that have the metric."""
    out: dict[float, dict[str, tuple[float, float, int]]] = {}
    for alpha in sorted({r.alpha for r in rows if r.alpha is not None}):
        rs = [r for r in rows if r.alpha == alpha]
        out[alpha] = {key: t_interval([r.metrics[key] for r in rs if r.metrics.get(key) is not None])
                      for key, *_ in SWEEP_METRICS}
    return out


def render_sweep(rows: list["RunRow"]) -> str:
    """Mean ± 95% CI (t over seeds) per alpha of held-out accuracy (all / per kind), effective rank and
    the calibration of P(A beats B); alpha 0 is the rank-only baseline."""
    summ = sweep_summary(rows)
    if not summ:
        return "No runs with loss.alpha found."

    def cell(v, pct):
        mean, hw, n = v
        if n == 0:
            return "–"
        k = 100.0 if pct else 1.0
        nd = 1 if pct else 3
        return f"{k * mean:.{nd}f}" + ("" if n < 2 else f" ± {k * hw:.{nd}f}")
    out = ["## Alpha sweep: mean ± 95% CI over seeds (t-interval)", "",
           "| alpha | seeds | " + " | ".join(lbl + (" (%)" if pct else "") for _, _, lbl, pct in SWEEP_METRICS) + " |",
           "|---|---:|" + "---:|" * len(SWEEP_METRICS)]
    for alpha, m in summ.items():
        n = max(v[2] for v in m.values())
        out.append(f"| {alpha:g}{' (rank-only)' if alpha == 0 else ''} | {n} | "
                   + " | ".join(cell(m[key], pct) for key, _, _, pct in SWEEP_METRICS) + " |")
    out.append("\nlog-lik.: mean log P(observed winner) (higher is better); Brier and ECE: lower is better; "
               "sel. acc k%: accuracy on the k% most confident pairs.")
    return "\n".join(out)


def sweep_plots(rows: list["RunRow"], out_dir: str, tracking_uri: str | None = None) -> list[str]:
    """accuracy (all / colour / quality) and effective rank vs alpha (mean ± CI, seeds as dots), and the
    reward-feature spectra (mean per alpha) from each run's ``repro_eval.json`` artifact when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summ = sweep_summary(rows)
    alphas = list(summ)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for key, colour in (("heldout_acc", "black"), ("acc_colour", "tab:red"), ("acc_quality", "tab:blue")):
        lbl = next(lbl for k, _, lbl, _ in SWEEP_METRICS if k == key)
        ys = [summ[a][key] for a in alphas]
        axes[0].errorbar(alphas, [y[0] for y in ys], yerr=[0 if y[2] < 2 else y[1] for y in ys], marker="o",
                         capsize=3, color=colour, label=lbl)
        for r in rows:
            if r.metrics.get(key) is not None:
                axes[0].plot(r.alpha, r.metrics[key], ".", color=colour, alpha=0.35)
    axes[0].axhline(0.5, ls=":", color="grey", lw=1)
    axes[0].set_xlabel("alpha (0 = rank-only)")
    axes[0].set_ylabel("held-out pairwise accuracy")
    axes[0].legend(fontsize=7)
    ys = [summ[a]["eff_rank"] for a in alphas]
    axes[1].errorbar(alphas, [y[0] for y in ys], yerr=[0 if y[2] < 2 else y[1] for y in ys], marker="o", capsize=3)
    for r in rows:
        if r.metrics.get("eff_rank") is not None:
            axes[1].plot(r.alpha, r.metrics["eff_rank"], ".", color="tab:blue", alpha=0.35)
    axes[1].set_xlabel("alpha (0 = rank-only)")
    axes[1].set_ylabel("effective rank of reward features")
    fig.suptitle("mean ± 95% CI over seeds; dots: single runs", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "accuracy_effrank_vs_alpha.png")
    plt.close(fig)
    paths.append(str(out / "accuracy_effrank_vs_alpha.png"))
    spectra: dict[float, list[list[float]]] = {}
    try:
        from mlflow.tracking import MlflowClient

        import tempfile

        client = MlflowClient(tracking_uri=tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            for r in rows:
                try:
                    local = client.download_artifacts(r.run_id, "repro_eval.json", tmp)
                except Exception:  # noqa: BLE001 - a run without the artifact simply has no spectrum
                    continue
                spectra.setdefault(r.alpha, []).append(json.loads(Path(local).read_text())["spectrum"])
    except ImportError:
        pass
    if spectra:
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
        for alpha in sorted(spectra):
            ss = spectra[alpha]
            n = min(len(s) for s in ss)
            mean = [sum(s[i] for s in ss) / len(ss) for i in range(n)]
            ax.semilogy(range(1, n + 1), mean, label=f"alpha {alpha:g} ({len(ss)} runs)")
        ax.set_xlabel("singular value index")
        ax.set_ylabel("normalised singular value")
        ax.set_title("reward-feature spectra (held-out), mean over seeds", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "spectra.png")
        plt.close(fig)
        paths.append(str(out / "spectra.png"))
    return paths


# ---------------------------------------------------------------- data-efficiency curve (make repro-curve)
CURVE_METRICS = ("heldout_acc", "acc_colour", "acc_quality", "eff_rank", "caption_kept", "log_likelihood", "brier", "ece")


def curve_summary(rows: list["RunRow"]) -> dict[tuple[int, float], dict[str, tuple[float, float, int]]]:
    """(training groups, alpha) → metric key → (mean, 95% t half-width, n seeds)."""
    cells: dict[tuple[int, float], list[RunRow]] = {}
    for r in rows:
        if r.train_groups is not None and r.alpha is not None:
            cells.setdefault((r.train_groups, r.alpha), []).append(r)
    return {k: {key: t_interval([r.metrics[key] for r in rs if r.metrics.get(key) is not None])
                for key, *_ in SWEEP_METRICS} for k, rs in sorted(cells.items())}


def groups_to_reach(curve: dict[int, float], target: float) -> float | None:
    """Fewest training groups at which ``curve`` (size → accuracy) reaches ``target``: the first size at or above
    it, interpolated linearly in log2(size) from the size before; None if no size reaches it."""
    ns = sorted(curve)
    for i, n in enumerate(ns):
        if curve[n] >= target:
            if i == 0:
                return float(n)
            n0, a0, a1 = ns[i - 1], curve[ns[i - 1]], curve[n]
            t = (target - a0) / (a1 - a0) if a1 > a0 else 1.0
            return float(2 ** (math.log2(n0) + t * (math.log2(n) - math.log2(n0))))
    return None


def fewer_groups_factor(rows: list["RunRow"], alpha: float, key: str = "heldout_acc", base_alpha: float = 0.0,
                        n_boot: int = 2000, seed: int = 0) -> dict | None:
    """How many times fewer groups JRM (``alpha``) needs to reach rank-only's mean ``key`` at the largest size:
    largest size / groups_to_reach(JRM mean curve, that target). 95% interval: bootstrap over seeds (each
    (size, alpha) cell resampled with replacement). A JRM curve that never reaches the target counts as factor 0
    (needs more than the largest size); one that reaches it at the smallest size is censored there (factor =
    largest / smallest, a lower bound)."""
    import random

    cells: dict[tuple[int, float], list[float]] = {}
    for r in rows:
        if r.train_groups is not None and r.alpha in (alpha, base_alpha) and r.metrics.get(key) is not None:
            cells.setdefault((r.train_groups, r.alpha), []).append(float(r.metrics[key]))
    sizes = sorted({n for n, a in cells if a == alpha} & {n for n, a in cells if a == base_alpha})
    if len(sizes) < 2:
        return None
    n_ref = sizes[-1]

    def factor(pick) -> float:
        target = sum(pick(n_ref, base_alpha)) / len(cells[(n_ref, base_alpha)])
        need = groups_to_reach({n: sum(pick(n, alpha)) / len(cells[(n, alpha)]) for n in sizes}, target)
        return 0.0 if need is None else n_ref / need

    point = factor(lambda n, a: cells[(n, a)])
    rng = random.Random(seed)
    boots = sorted(factor(lambda n, a: [rng.choice(cells[(n, a)]) for _ in cells[(n, a)]]) for _ in range(n_boot))
    lo, hi = boots[int(0.025 * n_boot)], boots[min(int(0.975 * n_boot), n_boot - 1)]
    return {"factor": point, "lo": lo, "hi": hi, "n_ref": n_ref, "n_min": sizes[0], "alpha": alpha, "key": key,
            "target": sum(cells[(n_ref, base_alpha)]) / len(cells[(n_ref, base_alpha)])}


def _factor_sentence(f: dict) -> str:
    cap = f["n_ref"] / f["n_min"]

    def show(v):
        return "0× (not reached)" if v == 0 else (f"≥ {v:.0f}×" if v >= cap else f"{v:.2f}×")
    lbl = next(lbl for k, _, lbl, _ in SWEEP_METRICS if k == f["key"])
    head = (f"JRM (alpha {f['alpha']:g}) vs rank-only's {lbl} at {f['n_ref']} groups ({100 * f['target']:.1f}%): ")
    head += ("JRM's mean curve does not reach it at any size tried" if f["factor"] == 0 else
             f"JRM needs {show(f['factor'])} fewer groups to reach it")
    return (head + f" (factor {show(f['factor'])}, 95% bootstrap interval over seeds {show(f['lo'])} to "
            f"{show(f['hi'])}; 1× = no gap, < 1× or 0× = JRM needs more groups).")


def render_curve(rows: list["RunRow"]) -> str:
    """The data-efficiency curve: per training-set size and alpha, mean ± 95% CI over seeds, then the
    "N× fewer groups" read-out for every JRM alpha."""
    summ = curve_summary(rows)
    if not summ:
        return "No curve runs (repro.train_groups) found."
    keys = [(k, lbl, pct) for k, _, lbl, pct in SWEEP_METRICS if k in CURVE_METRICS]

    def cell(v, pct):
        mean, hw, n = v
        if n == 0:
            return "–"
        k, nd = (100.0, 1) if pct else (1.0, 3)
        return f"{k * mean:.{nd}f}" + ("" if n < 2 else f" ± {k * hw:.{nd}f}")
    out = ["## Data-efficiency curve: mean ± 95% CI over seeds (t-interval)", "",
           "| groups | alpha | seeds | " + " | ".join(lbl + (" (%)" if pct else "") for _, lbl, pct in keys) + " |",
           "|---:|---|---:|" + "---:|" * len(keys)]
    for (n, alpha), m in summ.items():
        seeds = max(v[2] for v in m.values())
        out.append(f"| {n} | {alpha:g}{' (rank-only)' if alpha == 0 else ''} | {seeds} | "
                   + " | ".join(cell(m[k], pct) for k, _, pct in keys) + " |")
    alphas = sorted({a for _, a in summ if a != 0})
    out.append("")
    for alpha in alphas:
        for key in ("heldout_acc", "acc_colour", "acc_quality"):
            f = fewer_groups_factor(rows, alpha, key)
            if f is not None:
                out.append("* " + _factor_sentence(f))
    return "\n".join(out)


def curve_plot(rows: list["RunRow"], out_dir: str) -> str:
    """One PNG: held-out accuracy (all / colour / quality), effective rank, caption retention and ECE vs the
    number of training groups (log scale), one line per alpha, mean ± 95% CI over seeds, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    summ = curve_summary(rows)
    alphas = sorted({a for _, a in summ})
    panels = ("heldout_acc", "acc_colour", "acc_quality", "eff_rank", "caption_kept", "ece")
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, panels):
        lbl = next(lbl for k, _, lbl, _ in SWEEP_METRICS if k == key)
        for i, alpha in enumerate(alphas):
            ns = [n for n, a in summ if a == alpha and summ[(n, a)][key][2] > 0]
            ys = [summ[(n, alpha)][key] for n in ns]
            c = colours[i % len(colours)]
            ax.errorbar([n * (1 + 0.04 * (i - (len(alphas) - 1) / 2)) for n in ns], [y[0] for y in ys],
                        yerr=[0 if y[2] < 2 else y[1] for y in ys], marker="o", capsize=3, color=c,
                        label=f"alpha {alpha:g}" + (" (rank-only)" if alpha == 0 else ""))
            for r in rows:
                if r.alpha == alpha and r.train_groups is not None and r.metrics.get(key) is not None:
                    ax.plot(r.train_groups * (1 + 0.04 * (i - (len(alphas) - 1) / 2)), r.metrics[key], ".",
                            color=c, alpha=0.35)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training groups")
        ax.set_title(lbl, fontsize=9)
        if key.startswith("acc") or key == "heldout_acc":
            ax.axhline(0.5, ls=":", color="grey", lw=1)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("data-efficiency curve: mean ± 95% CI over seeds; dots: single runs", fontsize=10)
    fig.tight_layout()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "data_efficiency_curve.png"
    fig.savefig(path)
    plt.close(fig)
    return str(path)


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
    train_groups: int | None = None  # repro.train_groups of a data-efficiency curve run (make repro-curve)


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
        **{key: _num(m.get(name)) for key, name, _, _ in SWEEP_METRICS if key not in ("heldout_acc", "eff_rank")},
    }
    return RunRow(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8], experiment=experiment,
                  backbone=p.get("model.name", "?"), alpha=_num(alpha), rank_mode=p.get("loss.rank_mode", "?"),
                  status=run.info.status, metrics=metrics,
                  train_groups=int(p["repro.train_groups"]) if p.get("repro.train_groups") else None)


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
    ap.add_argument("--sweep", action="store_true",
                    help="the alpha sweep only: mean ± 95%% CI over seeds per alpha (make repro-toy); per training-set "
                         "size and alpha when the runs carry repro.train_groups (make repro-curve)")
    ap.add_argument("--plots", default=None, help="--sweep: write accuracy / effective rank vs alpha and spectra here")
    a = ap.parse_args(argv)
    try:
        rows = gather(a.tracking_uri, a.experiment, a.all_statuses)
    except ReportError as e:
        print(f"jrm-report: error: {e}", file=sys.stderr)
        return 2
    curve = a.sweep and any(r.train_groups is not None for r in rows)
    md = render_curve(rows) if curve else render_sweep(rows) if a.sweep else render(rows)
    if a.sweep and a.plots and rows:
        pngs = [curve_plot(rows, a.plots)] if curve else sweep_plots(rows, a.plots, a.tracking_uri)
        md += "\n\nPlots: " + ", ".join(pngs)
    print(json.dumps([asdict(r) for r in rows], indent=2) if a.json else md)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# JRM results\n\n" + md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
