"""Representation analysis: effective rank of reward-token features over a shard, the singular-value
spectrum (PNG), and a side-by-side of two or more checkpoints (the paper: JRM 91.77 vs rank-only 46.86).

Features are the backbone's hidden state at ``<|reward|>`` on the prompt only (what the reward head
reads at inference), one row per candidate of every group read from the shard(s). The reward head on
the same features gives (mu, sigma) per candidate, so the shards' rankings also yield pairwise accuracy
and the calibration of P(A beats B) (one reliability PNG per checkpoint) without a second forward.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import torch

from jrm_dist.metrics import effective_rank, singular_values


def shard_groups(spec: str, max_groups: int | None = None) -> Iterator[tuple[dict, dict[str, bytes]]]:
    """(record, images) of each group in shard order (no shuffle), validated by the loader's decoder.
    ``spec``: a manifest.json, a folder holding one, a brace pattern, or ``::``-joined URLs."""
    import webdataset as wds

    from jrm_dist.data.decode import decode_sample
    from jrm_dist.data.shards import resolve_shards

    urls = [s.url for s in resolve_shards(spec)]
    n = 0
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        if max_groups is not None and n >= max_groups:
            return
        try:
            rec, images = decode_sample(raw)
        except ValueError as e:
            raise ValueError(f"{raw.get('__url__', spec)}: {e}") from e
        n += 1
        yield rec, images


def reward_features(scorer, groups: Sequence[tuple[dict, dict[str, bytes]]], desc: str = "features",
                    with_scores: bool = False):
    """[n_candidates, hidden] reward-token features of every candidate, batched like scoring; with
    ``with_scores`` also (mu, sigma) per candidate from the reward head on those features (what
    ``JointRewardModel.score`` computes)."""
    from tqdm import tqdm

    from jrm_dist.data.collate import EncodedGroup
    from jrm_dist.processing import open_image

    todo = []
    for rec, images in groups:
        key = rec["key"]
        src = [images[n] for n in rec.get("source_images") or []]
        for k, c in enumerate(rec["candidates"]):
            todo.append((key, rec["instruction"], src, [images[n] for n in c.get("images") or []], c.get("text")))
    feats, mus, sigmas = [], [], []
    with tqdm(total=len(todo), desc=desc, unit="cand") as bar:
        for i in range(0, len(todo), scorer.batch_size):
            chunk = todo[i: i + scorer.batch_size]
            enc = [scorer.encode(instr, [open_image(b, f"group {key} source") for b in src],
                                 [open_image(b, f"group {key} candidate") for b in cand], text)
                   for key, instr, src, cand, text in chunk]
            batch = scorer.collator([EncodedGroup(str(j), [e], [], [], []) for j, e in enumerate(enc)])
            with torch.inference_mode():
                f = scorer.model.features(scorer._to_device(batch))
                feats.append(f.float().cpu())
                if with_scores:
                    mu, log_var = scorer.model.reward_head(f)
                    mus.append(mu.float().cpu())
                    sigmas.append(torch.exp(0.5 * log_var).float().cpu())
            bar.update(len(chunk))
    if not feats:
        raise ValueError("no candidates read from the shard(s)")
    if with_scores:
        return torch.cat(feats), torch.cat(mus), torch.cat(sigmas)
    return torch.cat(feats)


def shard_calibration(groups: Sequence[tuple[dict, dict[str, bytes]]], mu: torch.Tensor, sigma: torch.Tensor,
                      rank: dict | None = None, rank_by: str = "overall"):
    """Calibration of P(winner beats loser) over every pair a group's ranking decides (``ranking``, else
    the ``rank_by`` scores, as training expands them; tie pairs left out). ``mu`` / ``sigma`` are per
    candidate in group order. Returns (metrics, (p, outcome))."""
    from jrm_dist.data.schema import group_ranking
    from jrm_dist.eval.common import records_calibration
    from jrm_dist.losses import ranking_to_pairs

    pairs, at = [], 0
    for rec, _ in groups:
        win, lose, tie = ranking_to_pairs(group_ranking(rec, rank_by))
        pairs += [{"score": [float(mu[at + w]), float(mu[at + l])],
                   "sigma": [float(sigma[at + w]), float(sigma[at + l])]} for w, l, t in zip(win, lose, tie) if not t]
        at += len(rec["candidates"])
    if at != mu.numel():
        raise ValueError(f"{mu.numel()} scores for {at} candidates")
    return records_calibration(pairs, lambda r: 1, rank)


def spectrum_plot(spectra: dict[str, torch.Tensor], eranks: dict[str, float], path: Path) -> None:
    """Normalised singular values (log scale) per checkpoint on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, s in spectra.items():
        p = (s / s.sum()).numpy()
        ax.semilogy(range(1, len(p) + 1), p, label=f"{label} (erank {eranks[label]:.2f})")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("normalised singular value")
    ax.set_title("Reward-token feature spectrum")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_rank(models: Sequence[str], labels: Sequence[str] | None, shards: str, out_dir: str | Path,
             max_groups: int | None = None, center: bool = False, rank_mode: str | None = None,
             rank_by: str = "overall", **scorer_kw) -> dict:
    """Features → effective rank → JSON + PNG + markdown for each checkpoint; ratios vs the first. The
    same pass gives each checkpoint's calibration of P(A beats B) on the shards' decided pairs
    (``reliability_<i>.png`` per checkpoint, in --model order)."""
    from jrm_dist.eval.common import Scorer, pct, rank_model
    from jrm_dist.metrics import reliability_diagram

    labels = list(labels or [])
    if labels and len(labels) != len(models):
        raise ValueError(f"{len(labels)} labels for {len(models)} models")
    labels = labels or [Path(m).name or str(m) for m in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels} (pass --label)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = list(shard_groups(shards, max_groups))
    results, spectra, eranks = [], {}, {}
    for i, (label, model) in enumerate(zip(labels, models)):
        scorer = Scorer(model, **scorer_kw)
        f, mu, sigma = reward_features(scorer, groups, desc=f"features {label}", with_scores=True)
        s = singular_values(f, center=center).float()
        er = effective_rank(f, center=center)
        spectra[label], eranks[label] = s, er
        cal, pairs = shard_calibration(groups, mu, sigma, rank_model(model, rank_mode), rank_by)
        png = out / f"reliability_{i}.png"
        reliability_diagram(*pairs, png, title=f"{label}: P(A beats B), {cal['rank_mode']}")
        results.append({"label": label, "model": str(model), "effective_rank": er, "n_features": f.shape[0],
                        "dim": f.shape[1], "singular_values": s.tolist(), "calibration": cal,
                        "reliability_plot": str(png)})
        del scorer
    base = results[0]["effective_rank"]
    for r in results:
        r["ratio_vs_first"] = r["effective_rank"] / base if base else float("nan")
    png = out / "spectrum.png"
    spectrum_plot(spectra, eranks, png)
    head = ["| Checkpoint | Effective rank | Features | Dim | vs first | Pairs | Accuracy | Log-lik. | Brier | ECE "
            "| Sel. acc. 25% | Rank mode |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    rows = [f"| {r['label']} | {r['effective_rank']:.2f} | {r['n_features']} | {r['dim']} | {r['ratio_vs_first']:.3f}x "
            f"| {c['n']} | {pct(c['sel_acc_100'])} | {c['log_likelihood']:.4f} | {c['brier']:.4f} | {c['ece']:.4f} "
            f"| {pct(c['sel_acc_25'])} | {c['rank_mode']} |" for r in results for c in [r["calibration"]]]
    table = "\n".join(head + rows)
    payload = {"benchmark": "effective-rank", "shards": shards, "groups": len(groups), "center": center,
               "rank_by": rank_by,
               "models": results, "table": table, "plot": str(png)}
    (out / "rank.json").write_text(json.dumps(payload, indent=1))
    (out / "rank.md").write_text(table + "\n")
    return payload
