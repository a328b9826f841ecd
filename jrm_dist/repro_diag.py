"""``python -m jrm_dist.repro_diag``: fast single-process diagnosis runs for the toy JRM study (issue 19).

Why: a ``jrm-train`` launch pays ~15 s of start-up, a checkpoint and an export per run, and shows the
held-out numbers only at the end. Diagnosing *why* a backbone does not learn the preference task needs
many short runs that vary one thing and read, at step 0 and along the way, the held-out accuracy per kind
and the state of the reward-token features. This builds the model, optimizer and schedule with the
trainer's own functions (``engine.build_model`` without DeepSpeed, ``param_groups``, ``group_lr_lambdas``,
``objective.joint_objective``), so a lever found here is a lever of ``jrm-train``; the sweep itself
(``jrm_dist.repro``) still trains with ``jrm-train``.

    python -m jrm_dist.repro_diag --backbone runs/tiny-pretrained --train DIR --eval DIR --steps 200 \
        [--eval-every 50] [--out result.json] [optim.lr=... loss.rank_mode=... data.prompt=...]
    python -m jrm_dist.repro_diag --frozen-head --backbone ... --train DIR --eval DIR --steps 600 \
        [--pairs-per-step 16] [--head-lr 1e-2]      # the head alone on the untrained states: raw vs standardised

Feature read-outs (held-out, prompt only): effective rank of the reward-token states raw (the sweep's
metric) and centred (the mean state removed: a large shared component alone makes the raw value ~1),
and the pair spread: mean over pairs of ||f_A - f_B|| / mean ||f - mean f||, how much the two candidates
of a group differ at the reward token compared with how much states differ at all.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def evaluate_model(model, collate, groups, rank_mode: str, batch_groups: int = 16) -> dict:
    """Held-out read-out of an in-memory model: accuracy overall / per ``meta.kind``, effective rank
    (raw and centred) and the pair spread of the reward-token states."""
    from jrm_dist.metrics import effective_rank

    was = model.training
    model.eval()
    hits: dict[str, list[int]] = {}
    feats, pair_d = [], []
    for i in range(0, len(groups), batch_groups):
        chunk = groups[i:i + batch_groups]
        b = collate([g for g, _ in chunk])
        f = model.features(b)
        mu, _ = model.reward_head(f)
        feats.append(f)
        for w, l, t in zip(b["win_idx"].tolist(), b["lose_idx"].tolist(), b["tie"].tolist()):
            if t:
                continue
            kind = chunk[int(b["group_index"][w])][1]
            hits.setdefault(kind, []).append(int(mu[w] > mu[l]))
            pair_d.append(float((f[w] - f[l]).norm()))
    model.train(was)
    f = torch.cat(feats)
    spread = float((f - f.mean(0)).norm(dim=1).mean())
    allh = [h for v in hits.values() for h in v]
    return {"accuracy": sum(allh) / len(allh), **{f"accuracy/{k}": sum(v) / len(v) for k, v in sorted(hits.items())},
            "effective_rank": effective_rank(f), "effective_rank_centred": effective_rank(f, center=True),
            "pair_spread": (sum(pair_d) / len(pair_d)) / max(spread, 1e-12), "feature_norm": float(f.norm(dim=1).mean())}


def encode_groups(proc, shards: Path, use_rationale: bool):
    """(EncodedGroup, kind) for every group of the shards."""
    from jrm_dist.data.collate import encode_group
    from jrm_dist.repro import _read_groups

    return [(encode_group(proc, r, im, use_rationale=use_rationale), r.get("meta", {}).get("kind", "all"))
            for r, im in _read_groups(shards)]


def run(cfg_dict: dict, train: Path, ev: Path, steps: int, eval_every: int, seed: int, log=print,
        stats_momentum: float = 0.0) -> dict:
    """One rank-only / joint run in this process."""
    from jrm_dist.config import config_from_dict
    from jrm_dist.data.collate import Collator
    from jrm_dist.engine import build_model, build_optimizer, group_lr_lambdas, param_groups
    from jrm_dist.objective import drop_lm, joint_objective
    from jrm_dist.processing import DEFAULT_PROMPT, RewardProcessor

    cfg_dict = json.loads(json.dumps(cfg_dict))
    cfg_dict.setdefault("train", {})["max_steps"] = steps
    cfg_dict["train"]["seed"] = seed
    cfg = config_from_dict(cfg_dict)
    proc = RewardProcessor.from_pretrained(cfg.model.name, prompt=cfg.data.prompt or DEFAULT_PROMPT,
                                           max_pixels=cfg.data.max_pixels, min_pixels=cfg.data.min_pixels,
                                           max_length=cfg.data.max_length)
    model = build_model(cfg, proc.reward_token_id, None)
    model.train()
    opt = build_optimizer(param_groups(model, cfg), cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, group_lr_lambdas(cfg, opt.param_groups))
    collate = Collator(proc)
    tr = encode_groups(proc, train, use_rationale=cfg.loss.alpha > 0)
    he = encode_groups(proc, ev, use_rationale=False)
    rng = random.Random(seed)
    order: list[int] = list(range(len(tr)))
    rng.shuffle(order)
    gpb = cfg.data.groups_per_batch
    if cfg.model.head_input_norm == "standardize":  # as jrm-train: the statistics of the first step's batch
        from jrm_dist.model import calibrate_head_input

        calibrate_head_input(model, [collate([tr[i][0] for i in order[:gpb]])])
    curve = [{"step": 0, **evaluate_model(model, collate, he, cfg.loss.rank_mode)}]
    log(json.dumps(curve[-1]))
    t0 = time.time()
    train_acc, rank_l = [], []
    for step in range(steps):
        if len(order) < gpb:
            perm = list(range(len(tr)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:gpb], order[gpb:]
        b = drop_lm(collate([tr[i][0] for i in idx]), cfg.loss, step)
        out = model(b)
        obj = joint_objective(out, b, cfg.loss, step)
        opt.zero_grad(set_to_none=True)
        obj["loss"].backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip)
        opt.step()
        sched.step()
        if stats_momentum > 0:  # track the drifting reward-token statistics (EMA of the step's states)
            with torch.no_grad():
                f = out["features"].double()
                hd = model.reward_head
                m = stats_momentum
                var = 1.0 / hd.in_scale.double() ** 2
                mean = (1 - m) * hd.in_shift.double() + m * f.mean(0)
                hd.set_input_stats(mean, (1 - m) * var + m * f.var(0))
        train_acc.append(float(obj["accuracy"]))
        rank_l.append(float(obj["rank"]))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            row = {"step": step + 1, "train_accuracy_last": sum(train_acc[-eval_every:]) / len(train_acc[-eval_every:]),
                   "rank_loss_last": sum(rank_l[-eval_every:]) / len(rank_l[-eval_every:]),
                   "seconds": round(time.time() - t0, 1),
                   **evaluate_model(model, collate, he, cfg.loss.rank_mode)}
            curve.append(row)
            log(json.dumps(row))
    return {"curve": curve, "final": curve[-1], "seconds": round(time.time() - t0, 1)}


def frozen_head_runs(cfg_dict: dict, train: Path, ev: Path, steps: int, pairs_per_step: int, lr: float,
                     seed: int, log=print) -> dict:
    """The head alone on the untrained backbone's reward-token states (computed once): a fresh RewardHead on
    the raw states vs one that standardises them (statistics of the first step's candidates, as
    model.head_input_norm=standardize), AdamW at ``lr``, ``pairs_per_step`` pairs a step. Separates what
    the features hold from what the optimisation finds (held-out accuracy per kind every 200 steps)."""
    from jrm_dist.config import config_from_dict
    from jrm_dist.data.collate import Collator
    from jrm_dist.engine import build_model
    from jrm_dist.model import RewardHead
    from jrm_dist.processing import DEFAULT_PROMPT, RewardProcessor

    cfg = config_from_dict(cfg_dict)
    proc = RewardProcessor.from_pretrained(cfg.model.name, prompt=cfg.data.prompt or DEFAULT_PROMPT,
                                           max_pixels=cfg.data.max_pixels, min_pixels=cfg.data.min_pixels,
                                           max_length=cfg.data.max_length)
    model = build_model(cfg, proc.reward_token_id, None).eval()
    collate = Collator(proc)

    @torch.no_grad()
    def pairs(path):
        groups = encode_groups(proc, path, use_rationale=False)
        win, lose, kinds = [], [], []
        for i in range(0, len(groups), 16):
            chunk = groups[i:i + 16]
            b = collate([g for g, _ in chunk])
            f = model.features(b)
            for w, l in zip(b["win_idx"].tolist(), b["lose_idx"].tolist()):
                win.append(f[w])
                lose.append(f[l])
                kinds.append(chunk[int(b["group_index"][w])][1])
        return torch.stack(win), torch.stack(lose), kinds
    tr, te = pairs(train), pairs(ev)
    rng = random.Random(seed)
    order = rng.sample(range(len(tr[0])), len(tr[0]))
    first = torch.cat([tr[0][order[:pairs_per_step]], tr[1][order[:pairs_per_step]]])
    out = {}
    for norm in ("none", "standardize"):
        torch.manual_seed(seed)
        head = RewardHead(tr[0].shape[1], cfg.model.head_hidden, norm)
        head.reset_parameters()
        if norm == "standardize":
            head.set_input_stats(first.mean(0), first.var(0))
        opt = torch.optim.AdamW([p for n, p in head.named_parameters() if not n.startswith("token.")], lr=lr,
                                weight_decay=0.0)
        r = random.Random(seed)
        curve = []
        for step in range(steps):
            idx = r.sample(range(len(tr[0])), pairs_per_step)
            loss = torch.nn.functional.softplus(-(head(tr[0][idx])[0] - head(tr[1][idx])[0])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % 200 == 0 or step + 1 == steps:
                with torch.no_grad():
                    hit = (head(te[0])[0] > head(te[1])[0]).float()
                row = {"step": step + 1, **{f"accuracy/{k}": float(hit[torch.tensor([x == k for x in te[2]])].mean())
                                            for k in sorted(set(te[2]))}}
                curve.append(row)
                log(json.dumps({"head_input_norm": norm, **row}))
        out[norm] = curve
    return out


def main(argv=None) -> int:
    from jrm_dist.config import _merge, parse_overrides

    ap = argparse.ArgumentParser(prog="jrm-repro-diag", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "repro_toy.yaml"))
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--train", required=True, help="training shards (jrm-prep synthetic)")
    ap.add_argument("--eval", required=True, help="held-out shards")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats-momentum", type=float, default=0.0,
                    help="head_input_norm=standardize: EMA update of the statistics after every step (0 = fixed)")
    ap.add_argument("--frozen-head", action="store_true",
                    help="only the head on the untrained backbone's states: raw vs standardised (frozen_head_runs)")
    ap.add_argument("--pairs-per-step", type=int, default=8, help="--frozen-head: pairs per step")
    ap.add_argument("--head-lr", type=float, default=1e-2, help="--frozen-head: AdamW learning rate")
    ap.add_argument("--out", default=None, help="write the curve as JSON here")
    ap.add_argument("overrides", nargs="*", help="jrm-train dotted keys (optim.lr=1e-4, loss.rank_mode=bt, ...)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = _merge(yaml.safe_load(Path(a.config).read_text()) or {}, parse_overrides(a.overrides))
    data.setdefault("model", {})["name"] = a.backbone
    data.pop("repro", None)
    if a.frozen_head:
        res = frozen_head_runs(data, Path(a.train), Path(a.eval), a.steps, a.pairs_per_step, a.head_lr, a.seed)
    else:
        res = run(data, Path(a.train), Path(a.eval), a.steps, a.eval_every, a.seed, stats_momentum=a.stats_momentum)
    res["overrides"] = a.overrides
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
