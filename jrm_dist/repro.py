"""``make repro-toy`` / ``python -m jrm_dist.repro [--config configs/repro_toy.yaml] [repro.KEY=V ...]``: the
JRM effect at toy scale (sweep settings: ``REPRO_DEFAULTS`` below; run settings: the jrm-train config).

1. the pretrained tiny backbone (``jrm-make-tiny --pretrain``; cached);
2. synthetic shards in a data-scarce regime (``repro.train_groups`` groups, a rationale on every
   candidate) and a held-out set (``repro.eval_groups``), both from ``jrm-prep synthetic``;
3. for every alpha in ``repro.alphas`` (0 = the rank-only baseline) and seed in ``repro.seeds``: one real
   ``jrm-train`` launch, equal steps, all runs in one MLflow experiment (``<out>/mlflow.db``);
4. each run's consolidated export is scored on the held-out groups: pairwise accuracy overall and per group
   kind (``meta.kind``: colour = instruction following, quality = noise), effective rank and spectrum of the
   reward-token features, calibration of P(A beats B) (metrics.calibration_metrics); logged to the run;
5. ``jrm-report --sweep`` renders mean ± 95% CI per alpha and the plots into ``<out>/report``.

A finished run (its ``repro_eval.json`` exists) is not trained again: re-running resumes the sweep.
``--only-alphas`` / ``--only-seeds`` / overrides (``train.max_steps=...``) serve pilots.

Data-efficiency curve (``make repro-curve``, configs/repro_curve.yaml): ``repro.group_sizes`` trains every
(alpha, seed) on nested training sets of those sizes (run names ``alpha<A>-seed<S>-n<N>``, the size logged as
the run param ``repro.train_groups``), ``repro.parallel`` runs that many single-threaded ``jrm-train``
processes at a time, and ``jrm-report --sweep`` then tabulates per size and alpha (report.render_curve).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The sweep settings (override with repro.KEY=V, or a --sweep YAML of these keys).
REPRO_DEFAULTS: dict[str, Any] = {
    "out": "runs/repro-toy",
    "backbone": "runs/tiny-pretrained",  # jrm-make-tiny --pretrain (built and cached when missing)
    "pretrain_steps": 500,
    "alphas": [0.0, 0.1, 0.3, 0.5],  # 0 = the rank-only baseline
    "seeds": [0, 1, 2],
    "train_groups": 256,  # data-scarce: a few hundred preference groups
    "train_quality_share": 0.25,  # mostly colour (instruction-following) groups: the hard kind
    "eval_groups": 256,
    "eval_quality_share": 0.5,
    "rationale_style": "verdict_first",  # a rationale on every candidate (data_prep/synthetic.py)
    "nproc": 1,
    # Data-efficiency curve (issue 19): one point per training-set size. Empty = the single size train_groups
    # and the run names alpha<A>-seed<S> as before; else run names alpha<A>-seed<S>-n<N>. The sets are nested:
    # the first N groups of the data seed (make_group is a pure function of (seed, index)).
    "group_sizes": [],
    "parallel": 1,  # concurrent jrm-train runs, each single-threaded (OMP_NUM_THREADS=1)
    "experiment": "repro-toy",
    "data_seed": 0,
    "eval_seed": 1,
}
EVAL_FILE = "repro_eval.json"


def load(path: str, overrides: list[str], sweep: str | None = None) -> tuple[dict, dict]:
    """(sweep settings, jrm-train config dict). ``sweep``: YAML of REPRO_DEFAULTS keys. Overrides:
    ``repro.KEY=V`` for the sweep, any jrm-train dotted key for the runs."""
    from jrm_dist.config import ConfigError, _merge, config_from_dict, parse_overrides

    data = yaml.safe_load(Path(path).read_text()) or {}
    data = _merge(data, {"repro": (yaml.safe_load(Path(sweep).read_text()) or {}) if sweep else {}})
    data = _merge(data, parse_overrides(overrides))
    repro = dict(REPRO_DEFAULTS)
    extra = set(data.get("repro") or {}) - set(REPRO_DEFAULTS)
    if extra:
        raise ConfigError(f"{sweep or path}: unknown repro keys {sorted(extra)} (valid: {sorted(REPRO_DEFAULTS)})")
    repro.update(data.pop("repro", None) or {})
    config_from_dict(data)  # fail early on a bad train config, naming the key
    return repro, data


def sizes(repro: dict) -> list[int]:
    """The training-set sizes of the sweep: ``group_sizes``, else the one ``train_groups``."""
    got = repro.get("group_sizes") or [repro["train_groups"]]
    if not isinstance(got, list) or not all(isinstance(n, int) and n > 0 for n in got):
        raise SystemExit(f"repro.group_sizes must be a list of positive integers, got {got!r}")
    return sorted(set(got))


def prepare_data(repro: dict) -> tuple[dict[int, Path], Path]:
    """Training shards per size (nested: the first N groups of ``data_seed``) and the held-out shards."""
    from data_prep.cli import main as prep

    out = Path(repro["out"]) / "data"
    trains = {n: out / f"train-{n}-q{repro['train_quality_share']}-s{repro['data_seed']}-{repro['rationale_style']}"
              for n in sizes(repro)}
    ev = out / f"eval-{repro['eval_groups']}-q{repro['eval_quality_share']}-s{repro['eval_seed']}"
    jobs = [(d, n, repro["data_seed"], repro["train_quality_share"]) for n, d in trains.items()]
    for d, n, seed, q in jobs + [(ev, repro["eval_groups"], repro["eval_seed"], repro["eval_quality_share"])]:
        if not (d / "manifest.json").exists():
            code = prep(["synthetic", "--out", str(d), "--groups", str(n), "--seed", str(seed), "--quality-share",
                         str(q), "--rationale-style", repro["rationale_style"], "--quiet"])
            if code != 0:
                raise SystemExit(f"jrm-prep synthetic failed for {d}")
    return trains, ev


def run_name(alpha: float, seed: int, n_groups: int | None = None) -> str:
    return f"alpha{alpha:g}-seed{seed}" + ("" if n_groups is None else f"-n{n_groups}")


def train_one(repro: dict, train_cfg: Path, train: Path, alpha: float, seed: int, uri: str,
              n_groups: int | None = None) -> Path:
    name = run_name(alpha, seed, n_groups)
    out = Path(repro["out"]) / "runs" / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(repro["nproc"]),
           "-m", "jrm_dist.train", "--config", str(train_cfg), f"model.name={repro['backbone']}",
           f"data.train_shards={train}", "data.eval_shards=", f"loss.alpha={alpha}", f"train.seed={seed}",
           f"data.seed={seed}", f"train.output_dir={out}", f"tracking.uri={uri}",
           f"tracking.experiment={repro['experiment']}", f"tracking.run_name={name}",
           "--resume", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false"}
    log = out.parent / f"{name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if p.returncode != 0:
        raise SystemExit(f"jrm-train failed for {name} (exit {p.returncode}); see {log}")
    return out


@torch.no_grad()
def evaluate_export(export: Path, shards: Path, rank_mode: str, batch_groups: int = 16) -> dict:
    """Score held-out groups with the exported model (reward head only, prompt-only sequences):
    accuracy overall and per ``meta.kind``, effective rank + spectrum of the reward features, and
    calibration of P(A beats B) on decided pairs (A = the lower candidate index)."""
    from jrm_dist.data.collate import Collator, encode_group
    from jrm_dist.metrics import calibration_metrics, effective_rank, singular_values, win_probability
    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import RewardProcessor

    proc = RewardProcessor.from_pretrained(str(export))
    model = JointRewardModel.from_pretrained(str(export)).eval()
    col = Collator(proc)
    recs = list(_read_groups(shards))
    hits: dict[str, list[int]] = {}
    p_win, outcome, feats = [], [], []
    for i in range(0, len(recs), batch_groups):
        chunk = recs[i:i + batch_groups]
        b = col([encode_group(proc, r, im, use_rationale=False) for r, im in chunk])
        f = model.features(b)  # the reward-token states on the prompt only; the head on them = model.score
        mu, log_var = model.reward_head(f)
        sigma = torch.exp(0.5 * log_var)
        feats.append(f)
        gi = b["group_index"]
        for w, l, t in zip(b["win_idx"].tolist(), b["lose_idx"].tolist(), b["tie"].tolist()):
            if t:
                continue
            kind = chunk[int(gi[w])][0].get("meta", {}).get("kind", "all")
            hits.setdefault(kind, []).append(int(mu[w] > mu[l]))
            a, c = min(w, l), max(w, l)
            p_win.append(float(win_probability(mu[a], sigma[a], mu[c], sigma[c], mode=rank_mode)))
            outcome.append(1.0 if a == w else 0.0)
    f = torch.cat(feats)
    allhits = [h for v in hits.values() for h in v]
    cal = calibration_metrics(torch.tensor(p_win), torch.tensor(outcome))
    res = {"eval/accuracy": sum(allhits) / len(allhits), "eval/effective_rank": effective_rank(f),
           "eval/groups": float(len(recs)),
           **{f"eval/accuracy/{k}": sum(v) / len(v) for k, v in sorted(hits.items())},
           **{f"eval/{k}": float(v) for k, v in cal.items() if k != "n"}, "eval/pairs": float(cal["n"])}
    s = singular_values(f)
    return {"metrics": res, "spectrum": (s / s.sum()).tolist()}


@torch.no_grad()
def probe_export(export: Path, shards: Path, batch_groups: int = 16) -> dict:
    """What the reward-token state can see: a linear probe (logistic regression, fitted on half of the
    colour groups' candidates, tested on the other half) for "this candidate follows the instruction",
    read at the reward token and at the last prompt position (where the LM predicts the first rationale
    token), the LM's own verdict there ("Follows" vs "Does", the first token of a verdict-first rationale),
    and the trained reward head's pair accuracy on the same test half."""
    from jrm_dist.data.collate import Collator, encode_group
    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import RewardProcessor

    proc = RewardProcessor.from_pretrained(str(export))
    model = JointRewardModel.from_pretrained(str(export)).eval()
    col = Collator(proc)
    recs = [(r, im) for r, im in _read_groups(shards) if r.get("meta", {}).get("kind") == "colour"]
    x_rew, x_last, y, grp, logits = [], [], [], [], []
    # first token of a verdict-first rationale: "Follows..." vs "Does not follow..."
    verdict_ids = [proc.tokenizer("Follows", add_special_tokens=False)["input_ids"][0],
                   proc.tokenizer("Does", add_special_tokens=False)["input_ids"][0]]
    for i in range(0, len(recs), batch_groups):
        chunk = recs[i:i + batch_groups]
        b = col([encode_group(proc, r, im, use_rationale=False) for r, im in chunk])
        h = model._hidden(b, b["input_ids"], b["attention_mask"], b["mm_token_type_ids"])
        rows = torch.arange(h.shape[0])
        x_rew.append(h[rows, b["reward_pos"]].float())
        last = h[rows, b["attention_mask"].sum(1) - 1]
        x_last.append(last.float())
        logits.append(model.backbone.get_output_embeddings()(last)[:, verdict_ids].float())
        y += [float(c["scores"]["instruction_following"] > 1) for r, _ in chunk for c in r["candidates"]]
        grp += [i + int(g) for g in b["group_index"]]
    y_t, grp_t = torch.tensor(y), torch.tensor(grp)
    test = (grp_t % 2) == 1  # whole groups on one side

    def probe(x):
        x = (x - x[~test].mean(0)) / (x[~test].std(0) + 1e-6)
        w = torch.zeros(x.shape[1], requires_grad=True)
        bias = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            with torch.enable_grad():
                loss = torch.nn.functional.binary_cross_entropy_with_logits(x[~test] @ w + bias, y_t[~test])
                loss = loss + 1e-2 * (w * w).sum()
                loss.backward()
            return loss
        with torch.enable_grad():
            opt.step(closure)
        return float(((x[test] @ w + bias > 0).float() == y_t[test]).float().mean())
    xr, xl = torch.cat(x_rew), torch.cat(x_last)
    mu, _ = model.reward_head(xr)
    pair_acc = []
    for gi in grp_t[test].unique():
        idx = (grp_t == gi).nonzero().flatten()
        win = idx[y_t[idx] == 1]
        lose = idx[y_t[idx] == 0]
        pair_acc += [float(mu[w] > mu[l]) for w in win for l in lose]
    lm_verdict = float(((torch.cat(logits).argmax(1) == 0).float() == y_t).float().mean())
    return {"lm_verdict_accuracy_at_last_prompt_token": lm_verdict, "probe_follows_at_reward_token": probe(xr), "probe_follows_at_last_prompt_token": probe(xl),
            "head_pair_accuracy_test_half": sum(pair_acc) / max(len(pair_acc), 1),
            "candidates": len(y), "test_candidates": int(test.sum())}


@torch.no_grad()
def caption_retention(export: Path, pretrained: Path, n: int = 128) -> float:
    """Is the pretrained skill kept? Greedy captions of ``n`` held-out images by the trained backbone
    (its own LM head; frozen in a rank-only run, so a drop there is the backbone's drift): share with
    the right colour word (the pretrained backbone: ``pretrain_eval.json``)."""
    from jrm_dist.backbones import load_backbone, load_image_processor, load_tokenizer
    from jrm_dist.pretrain import Encoder, evaluate

    enc = Encoder(load_tokenizer(str(export)), load_image_processor(str(pretrained)))
    return float(evaluate(load_backbone(str(export)), enc, n=n)["caption_colour_accuracy"])


def _read_groups(shards: Path):
    """(record, images) of every group in the shards, in manifest order."""
    from data_prep.shards import iter_tar_samples
    from jrm_dist.data.decode import decode_sample

    man = json.loads((shards / "manifest.json").read_text())
    for entry in man["shards"]:
        for sample in iter_tar_samples(str(shards / entry["name"])):
            yield decode_sample(sample)


def log_to_run(uri: str, experiment: str, name: str, result: dict, path: Path, params: dict | None = None) -> str:
    """Add the held-out metrics (and ``params``, e.g. the training-set size) and the spectrum file to the
    run's MLflow record (batch logging)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"no MLflow run named {name} in experiment {experiment} at {uri}")
    rid = runs[0].info.run_id
    now = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in result["metrics"].items()],
                     params=[Param(k, str(v)) for k, v in (params or {}).items()])
    client.log_artifact(rid, str(path))
    return rid


@torch.no_grad()
def lm_readout(export: Path, shards: Path, batch_groups: int = 16) -> dict:
    """Teacher-forced read-out of the LM on the held-out colour groups' verdict-first rationales
    ("Does not follow: the square is X, not Y."): is the first (verdict) token right, is the painted colour
    X named right, is the asked colour Y named right (argmax over the palette's colour tokens)."""
    from data_prep.synthetic import COLOURS
    from jrm_dist.data.collate import Collator, encode_group
    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import IGNORE_INDEX, RewardProcessor

    proc = RewardProcessor.from_pretrained(str(export))
    model = JointRewardModel.from_pretrained(str(export)).eval()
    col = Collator(proc)
    lm_head = model.backbone.get_output_embeddings()
    ids = torch.tensor([proc.tokenizer(" " + c, add_special_tokens=False)["input_ids"][0] for c in COLOURS])
    recs = [(r, im) for r, im in _read_groups(shards) if r.get("meta", {}).get("kind") == "colour"]
    n = verdict = painted = asked = n_asked = 0
    for i in range(0, len(recs), batch_groups):
        chunk = recs[i:i + batch_groups]
        b = col([encode_group(proc, r, im, use_rationale=True) for r, im in chunk])
        h = model._hidden(b, b["input_ids"], b["attention_mask"], b["mm_token_type_ids"])
        for row in range(h.shape[0]):
            toks = b["input_ids"][row]
            start = int((b["labels"][row] != IGNORE_INDEX).nonzero()[0])
            n += 1
            verdict += int(int(lm_head(h[row, start - 1]).argmax()) == int(toks[start]))
            pos = [p for p in range(start, int(b["attention_mask"][row].sum())) if int(toks[p]) in ids.tolist()]
            if pos:
                painted += int(ids[lm_head(h[row, pos[0] - 1])[ids].argmax()] == toks[pos[0]])
            if len(pos) > 1:
                n_asked += 1
                asked += int(ids[lm_head(h[row, pos[1] - 1])[ids].argmax()] == toks[pos[1]])
    return {"lm_verdict_token_right": verdict / max(n, 1), "lm_painted_colour_right": painted / max(n, 1),
            "lm_asked_colour_right": asked / max(n_asked, 1), "candidates": n}


def probe_runs(out: Path, ev: Path) -> int:
    keys = ("probe_follows_at_reward_token", "probe_follows_at_last_prompt_token", "head_pair_accuracy_test_half",
            "lm_verdict_token_right", "lm_painted_colour_right", "lm_asked_colour_right")
    print("| run | probe at reward token | probe at last prompt token | reward head (test half) | LM verdict "
          "token | LM painted colour | LM asked colour |\n|---|---:|---:|---:|---:|---:|---:|")
    for run_dir in sorted((out / "runs").glob("alpha*")):
        if not (run_dir / EVAL_FILE).exists():
            continue
        res = probe_export(run_dir / "export", ev)
        res.update(lm_readout(run_dir / "export", ev))
        (run_dir / "probe.json").write_text(json.dumps(res, indent=2))
        print(f"| {run_dir.name} | " + " | ".join(f"{100 * res[k]:.1f}" for k in keys) + " |", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jrm-repro", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "repro_toy.yaml"), help="jrm-train config of every run")
    ap.add_argument("--sweep", default=None, help="optional YAML of sweep settings (keys of REPRO_DEFAULTS)")
    ap.add_argument("overrides", nargs="*", help="repro.KEY=V or jrm-train dotted keys (train.max_steps=...)")
    ap.add_argument("--only-alphas", type=float, nargs="*", default=None)
    ap.add_argument("--only-seeds", type=int, nargs="*", default=None)
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--retention", action="store_true",
                    help="only add the caption-retention metric to finished runs that lack it (and log it)")
    ap.add_argument("--probe", action="store_true",
                    help="only probe the finished runs (probe_export -> <run>/probe.json) and print a table")
    a = ap.parse_intermixed_args(argv)
    t_all = time.time()
    torch.set_num_threads(1)  # scoring and pre-training: one thread is fastest on a busy 2-core machine
    repro, train_dict = load(a.config, a.overrides, a.sweep)
    out = Path(repro["out"])
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    t0 = time.time()
    from jrm_dist.pretrain import pretrain_tiny_backbone

    pretrain_tiny_backbone(repro["backbone"], steps=int(repro["pretrain_steps"]), threads=1)
    print(f"[repro] backbone {repro['backbone']} ready ({time.time() - t0:.0f}s)", flush=True)
    trains, ev = prepare_data(repro)
    if a.probe:
        return probe_runs(out, ev)
    if a.retention:
        for run_dir in sorted((out / "runs").glob("alpha*")):
            f = run_dir / EVAL_FILE
            if f.exists() and "eval/caption_colour_accuracy" not in json.loads(f.read_text())["metrics"]:
                res = json.loads(f.read_text())
                res["metrics"]["eval/caption_colour_accuracy"] = caption_retention(run_dir / "export",
                                                                                   Path(repro["backbone"]))
                f.write_text(json.dumps(res, indent=2))
                log_to_run(uri, repro["experiment"], run_dir.name,
                           {"metrics": {"eval/caption_colour_accuracy": res["metrics"]["eval/caption_colour_accuracy"]}}, f)
                print(f"[repro] {run_dir.name}: caption colour kept {res['metrics']['eval/caption_colour_accuracy']:.3f}",
                      flush=True)
        return 0
    train_cfg = out / "train_config.yaml"
    train_cfg.write_text(yaml.safe_dump(train_dict, sort_keys=False))
    alphas = a.only_alphas if a.only_alphas is not None else repro["alphas"]
    seeds = a.only_seeds if a.only_seeds is not None else repro["seeds"]
    curve = bool(repro["group_sizes"])
    # seeds outermost: a cut-short sweep still has every alpha (and size) for the first seeds
    jobs = [(float(alpha), int(seed), n if curve else None) for seed in seeds for n in sizes(repro) for alpha in alphas]
    rank_mode = train_dict.get("loss", {}).get("rank_mode", "thurstone")
    mlflow_lock = threading.Lock()  # one writer of the sweep's sqlite store at a time from this process

    def job(alpha: float, seed: int, n: int | None) -> None:
        name = run_name(alpha, seed, n)
        run_dir = out / "runs" / name
        if (run_dir / EVAL_FILE).exists():
            print(f"[repro] {name}: done already, kept", flush=True)
            return
        t0 = time.time()
        train_one(repro, train_cfg, trains[n or sizes(repro)[0]], alpha, seed, uri, n)
        t1 = time.time()
        res = evaluate_export(run_dir / "export", ev, rank_mode)
        res["metrics"]["eval/caption_colour_accuracy"] = caption_retention(run_dir / "export", Path(repro["backbone"]))
        res.update({"alpha": alpha, "seed": seed, "train_groups": n or repro["train_groups"],
                    "train_s": round(t1 - t0, 1), "eval_s": round(time.time() - t1, 1)})
        (run_dir / EVAL_FILE).write_text(json.dumps(res, indent=2))
        with mlflow_lock:
            log_to_run(uri, repro["experiment"], name, res, run_dir / EVAL_FILE,
                       params={"repro.train_groups": res["train_groups"]})
        m = res["metrics"]
        print(f"[repro] {name}: acc {m['eval/accuracy']:.3f} (colour {m.get('eval/accuracy/colour', float('nan')):.3f}, "
              f"quality {m.get('eval/accuracy/quality', float('nan')):.3f}), eff. rank "
              f"{m['eval/effective_rank']:.2f}, ECE {m['eval/ece']:.3f}; train {t1 - t0:.0f}s, "
              f"eval {time.time() - t1:.0f}s", flush=True)

    parallel = max(int(repro["parallel"]), 1)
    if parallel == 1:
        for j in jobs:
            job(*j)
    else:  # each run is its own jrm-train process (single-threaded); scoring runs in this process's threads
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            for f in [pool.submit(job, *j) for j in jobs]:
                f.result()
    print(f"[repro] sweep done in {time.time() - t_all:.0f}s", flush=True)
    if not a.no_report:
        from jrm_dist.report import main as report

        return report(["--tracking-uri", uri, "--experiment", repro["experiment"], "--sweep",
                       "--plots", str(out / "report"), "--out", str(out / "report" / "report.md")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
