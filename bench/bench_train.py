"""Training-step benchmark: JRM's joint step vs an EditReward-style baseline, and ZeRO-3 memory per rank.

    python bench/bench_train.py [--backbone DIR] [--vocab 151936] [--groups 4] [--steps 5]

Part 1 (one process each, plain PyTorch, same tiny backbone, same synthetic groups, AdamW):
  ours      one forward over all candidates of the micro-batch; LM cross-entropy only at the labelled
            rationale positions (gather, then project); closed-form Thurstone rank loss.
  baseline  EditReward-style: candidate A batch forward, then candidate B batch forward; LM loss from the
            full [B, T, V] logits; 1000-sample Monte-Carlo Bradley-Terry rank loss.
  Reported: pairs/s and peak RSS (each method runs in its own child process, so ru_maxrss is its own).
  --vocab resizes the tiny backbone's vocabulary to a real one (Qwen2.5: 151936) so the full-logits cost
  is what a real run pays; the transformer stays tiny.

Part 2: ``jrm_dist.train`` with ZeRO-3 on 1 and on 2 CPU ranks (gloo), 2 steps each: parameters +
  optimizer state held per rank (from <run>/ranks/rank_*.json).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _result import emit  # noqa: E402  (bench/ is sys.path[0] when run as a script)


def build_backbone(base: str | None, vocab: int, tmp: Path) -> str:
    from jrm_dist.backbones import build_tiny_backbone

    path = Path(base) if base else build_tiny_backbone(tmp / "tiny")
    if vocab <= 0:
        return str(path)
    import torch
    from transformers import AutoModelForImageTextToText

    from jrm_dist.backbones import load_image_processor, load_tokenizer

    out = tmp / f"tiny-vocab{vocab}"
    if not (out / "config.json").exists():
        m = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32)
        m.resize_token_embeddings(vocab, mean_resizing=False)
        m.save_pretrained(out, safe_serialization=True)
        load_tokenizer(str(path)).save_pretrained(out)
        load_image_processor(str(path)).save_pretrained(out)
    return str(out)


def batches(backbone: str, n_groups: int, steps: int):
    from data_prep.synthetic import make_group
    from jrm_dist.data.collate import Collator, encode_group
    from jrm_dist.processing import RewardProcessor

    proc = RewardProcessor.from_pretrained(backbone, max_pixels=3136, min_pixels=784, max_length=512)
    col = Collator(proc)
    return proc, [col([encode_group(proc, *make_group(0, s * n_groups + g)) for g in range(n_groups)])
                  for s in range(steps + 1)]


def baseline_step(model, batch, alpha: float, n_mc: int = 1000):
    """EditReward-style: two passes (A then B), full-vocab logits for the LM loss, Monte-Carlo BT."""
    import torch
    import torch.nn.functional as F

    from jrm_dist.losses import mc_bt_loss

    win, lose = batch["win_idx"], batch["lose_idx"]
    mus, lvs, lm_sum, lm_n = [], [], 0.0, 0
    for rows in (win, lose):
        sub = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "reward_pos")}
        pv, grid = [], []
        # pixel rows of the selected candidates (each candidate: its own images, in order)
        counts = (batch["image_grid_thw"].prod(-1)).tolist()
        per_seq = len(counts) // batch["input_ids"].shape[0]
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        for r in rows.tolist():
            for j in range(r * per_seq, (r + 1) * per_seq):
                pv.append(batch["pixel_values"][starts[j]:starts[j + 1]])
                grid.append(batch["image_grid_thw"][j:j + 1])
        out = model.backbone(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"],
                             mm_token_type_ids=sub["mm_token_type_ids"], pixel_values=torch.cat(pv),
                             image_grid_thw=torch.cat(grid), output_hidden_states=True, use_cache=False)
        h = out.hidden_states[-1]
        feats = h[torch.arange(h.shape[0]), sub["reward_pos"]]
        mu, lv = model.reward_head(feats)
        mus.append(mu)
        lvs.append(lv)
        logits = out.logits[:, :-1].float()  # [B, T, V]: the full vocabulary at every position
        labels = sub["labels"][:, 1:]
        lm_sum = lm_sum + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                          ignore_index=-100, reduction="sum")
        lm_n += int((labels != -100).sum())
    n = len(win)
    mu = torch.cat(mus)
    lv = torch.cat(lvs)
    rank = mc_bt_loss(mu, lv, torch.arange(n), torch.arange(n, 2 * n), n_samples=n_mc)
    return (1 - alpha) * rank + alpha * lm_sum / max(lm_n, 1)


def worker(args) -> None:
    """One method in this process: warm-up step, then timed steps; prints a JSON line."""
    import torch

    from jrm_dist.config import load_config
    from jrm_dist.engine import build_model, build_optimizer, param_groups
    from jrm_dist.objective import joint_objective

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"model.name={args.backbone}", "model.lm_ce=auto"])
    proc, data = batches(args.backbone, args.groups, args.steps)
    model = build_model(cfg, proc.reward_token_id, None)
    opt = build_optimizer(param_groups(model, cfg), cfg)
    pairs = 0
    t0 = None
    for i, b in enumerate(data):
        if i == 1:
            t0 = time.perf_counter()
        if args.worker == "ours":
            loss = joint_objective(model(b), b, cfg.loss, i)["loss"]
        else:
            loss = baseline_step(model, b, cfg.loss.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 1:
            pairs += int(b["win_idx"].numel())
    dt = time.perf_counter() - t0
    print(json.dumps({"method": args.worker, "pairs_per_s": pairs / dt, "step_s": dt / args.steps,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_worker(method: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--backbone", args.backbone, "--groups", str(args.groups),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if p.returncode != 0:
        raise SystemExit(f"{method} worker failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def zero_memory(backbone: str, tmp: Path) -> dict[int, dict]:
    """Per-rank parameter + optimizer bytes of jrm_dist.train (ZeRO-3) on 1 and 2 ranks."""
    from data_prep.cli import main as prep

    shards = tmp / "shards"
    if not (shards / "manifest.json").exists():
        prep(["synthetic", "--out", str(shards), "--groups", "16", "--seed", "0", "--quiet"])
    res = {}
    for world in (1, 2):
        out = tmp / f"zero_w{world}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               "-m", "jrm_dist.train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"model.name={backbone}",
               f"data.train_shards={shards}", "data.eval_shards=", f"train.output_dir={out}", "train.max_steps=2",
               "train.save_every=0", "tracking.enabled=false", "data.groups_per_batch=2", "--resume", "none"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
        if p.returncode != 0:
            raise SystemExit(f"train on {world} rank(s) failed:\n{p.stderr[-3000:]}")
        infos = [json.loads(f.read_text()) for f in sorted((out / "ranks").glob("rank_*.json"))]
        res[world] = max(({"param_bytes": i["params_local"] * 4, "optim_bytes": i["optimizer_state_bytes"],
                           "params_total": i["params_total"]} for i in infos), key=lambda d: d["optim_bytes"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default=None, help="tiny backbone dir (default: build one in a temp dir)")
    ap.add_argument("--vocab", type=int, default=151936, help="resize the vocabulary (0 = keep the tiny one)")
    ap.add_argument("--groups", type=int, default=4, help="groups (K=2) per step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-zero", action="store_true", help="skip part 2 (the two training launches)")
    ap.add_argument("--skip-packing", action="store_true", help="skip the group-packing comparison")
    ap.add_argument("--only-packing", action="store_true", help="run only the group-packing comparison")
    ap.add_argument("--pack-groups", type=int, default=2, help="groups per step in the packing comparison")
    ap.add_argument("--pack-steps", type=int, default=5, help="timed steps per method in the packing comparison")
    ap.add_argument("--worker", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    ap.add_argument("--packing-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.packing_worker:
        return packing_worker(args)
    if args.only_packing:
        with tempfile.TemporaryDirectory(prefix="bench_train_") as d:
            return bench_packing(args, build_backbone(args.backbone, 0, Path(d)), Path(d))
    with tempfile.TemporaryDirectory(prefix="bench_train_") as d:
        tmp = Path(d)
        tiny = build_backbone(args.backbone, 0, tmp)
        args.backbone = build_backbone(tiny, args.vocab, tmp) if args.vocab else tiny
        ours = run_worker("ours", args)
        base = run_worker("baseline", args)
        print(f"\n== joint step, tiny Qwen2.5-VL (vocab {args.vocab or 'tiny'}), {args.groups} groups x K=2 per step, "
              f"{args.steps} timed steps, {args.threads} thread(s)")
        print(f"{'':28s}{'ours (JRM)':>14s}{'EditReward-style':>18s}{'ratio':>10s}")
        print(f"{'pairs/s':28s}{ours['pairs_per_s']:14.2f}{base['pairs_per_s']:18.2f}"
              f"{ours['pairs_per_s'] / base['pairs_per_s']:9.2f}x")
        print(f"{'peak RSS (MB)':28s}{ours['peak_rss_mb']:14.0f}{base['peak_rss_mb']:18.0f}"
              f"{base['peak_rss_mb'] / ours['peak_rss_mb']:9.2f}x less")
        emit("train: joint step pairs/s vs EditReward-style", ours["pairs_per_s"], base["pairs_per_s"], "pairs/s", True,
             "baseline: A then B forwards, full-vocabulary logits, MC(1000) rank loss")
        emit("train: joint step peak RSS", ours["peak_rss_mb"], base["peak_rss_mb"], "MB", False)
        rank_only_vs_lm(args)
        if not args.skip_zero:
            z = zero_memory(tiny, tmp)
            one, two = z[1], z[2]
            tot1, tot2 = one["param_bytes"] + one["optim_bytes"], two["param_bytes"] + two["optim_bytes"]
            print(f"\n== ZeRO-3 per-rank memory, jrm_dist.train, {one['params_total']:,} parameters (fp32, AdamW)")
            print(f"{'':28s}{'1 rank':>14s}{'2 ranks':>18s}{'ratio':>10s}")
            for name, a, b in (("parameters (KB)", one["param_bytes"], two["param_bytes"]),
                               ("optimizer state (KB)", one["optim_bytes"], two["optim_bytes"]),
                               ("params + optimizer (KB)", tot1, tot2)):
                print(f"{name:28s}{a / 1024:14.1f}{b / 1024:18.1f}{b / a:9.2f}x")
            emit("train: ZeRO-3 params+optimizer per rank, 2 ranks vs 1", tot2 / 1024, tot1 / 1024, "KB", False)
        if not args.skip_packing:
            bench_packing(args, tiny, tmp)



# ------------------------------------------------------------------- group packing (data.packing=group)
PACK_SIDE = 448  # 448 x 448 -> 256 merged tokens per image, as configs/qwen2_5_vl_7b.yaml (data.max_pixels)
PACK_RATIONALE = (50, 250)  # rationale tokens per candidate, drawn uniformly
PACK_WORDS = ("the square is now red and the edit follows the instruction while the background stays the same but "
              "image slightly noisy so result not perfect colour clean edge left right top bottom").split()


def lm_head_share_vocab(tiny_dir: str) -> tuple[int, float]:
    """Vocabulary that gives the tiny model the LM head's share of the step's model FLOPs that it has at 7B
    (jrm-plan's FLOP model, EditReward-like workload: 2 images x 256 tokens, ~60 prompt and 150 rationale
    tokens per candidate, K=2). Returns (vocab, 7B share)."""
    import dataclasses

    from jrm_dist import plan as P
    from jrm_dist.config import load_config

    def parts(cfg, arch, vocab):
        arch = dataclasses.replace(arch, vocab=vocab)
        w = P.Workload(groups=1, candidates=2, seq_len=2 * 256 + 60 + 150, images_per_seq=2, image_tokens=256,
                       labelled=150)
        with_lm = P.flops(cfg, arch, w, "fused")[0]
        cfg0 = load_config(None, [f"model.name={cfg.model.name}", "loss.alpha=0"])
        cfg0.model = cfg.model
        return with_lm - P.flops(cfg0, arch, w, "fused")[0], with_lm

    cfg7 = load_config(str(ROOT / "configs" / "qwen2_5_vl_7b.yaml"))
    a7 = P.load_arch(cfg7.model.name)
    lm7, tot7 = parts(cfg7, a7, a7.vocab)
    share = lm7 / tot7
    cfg_t = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"model.name={tiny_dir}"])
    at = P.load_arch(tiny_dir)
    lm1, tot1 = parts(cfg_t, at, 1)  # f_lm is linear in the vocabulary
    rest = tot1 - lm1
    return max(int(round(share * rest / (lm1 * (1 - share)))), 64), share


def packing_groups(proc, k: int, n_groups: int, seed: int):
    """EditReward-like groups: one source and one candidate image of equal size, K candidates with
    distinct scores (all K(K-1)/2 pairs decided), rationales of 50-250 tokens."""
    import random

    import numpy as np
    from PIL import Image

    from jrm_dist.data.collate import EncodedGroup

    rng = random.Random(seed)
    tok = proc.tokenizer

    def image(s):
        return Image.fromarray(np.random.default_rng(s).integers(0, 256, (PACK_SIDE, PACK_SIDE, 3), dtype=np.uint8))

    def rationale(n):
        words = []
        while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < n:
            words += [rng.choice(PACK_WORDS) for _ in range(max(1, (n - len(words)) // 3))]
        ids = tok(" ".join(words), add_special_tokens=False)["input_ids"][:n - 1]  # + <eos>
        return tok.decode(ids)

    groups = []
    for g in range(n_groups):
        src = [image(seed * 1000 + g)]
        encs = [proc.encode("make the square red", src, [image(seed * 1000 + 500 + 10 * g + i)], None,
                            rationale(rng.randint(*PACK_RATIONALE))) for i in range(k)]
        win = [a for a in range(k) for b in range(a + 1, k)]
        lose = [b for a in range(k) for b in range(a + 1, k)]
        groups.append(EncodedGroup(f"g{seed}-{g}", encs, win, lose, [False] * len(win)))
    return groups


class _Stopwatch:
    """Forward wall time of a few module kinds (hooks): where a step's forward goes."""

    def __init__(self, model):
        import collections

        self.t = collections.defaultdict(float)
        self.handles = []
        base = model.backbone.base_model
        kinds = {"vision tower": [base.visual], "LM head": [model.backbone.get_output_embeddings()],
                 "text attention": [l.self_attn for l in base.language_model.layers],
                 "text MLP": [l.mlp for l in base.language_model.layers]}
        for name, mods in kinds.items():
            for m in mods:
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(lambda mod, i, o, n=name: self._post(mod, n)))
        self.start = {}

    def _pre(self, mod, inp):
        self.start[id(mod)] = time.perf_counter()

    def _post(self, mod, name):
        self.t[name] += time.perf_counter() - self.start.pop(id(mod))

    def close(self):
        for h in self.handles:
            h.remove()


def packing_worker(args) -> None:
    """Interleaved packed / unpacked training steps (same model, same groups) for K=2 and K=4; medians.
    Prints one JSON line."""
    import statistics

    import torch

    from jrm_dist.config import load_config
    from jrm_dist.data.collate import Collator
    from jrm_dist.data.packing import PackedCollator, padding_stats
    from jrm_dist.engine import build_model, build_optimizer, param_groups
    from jrm_dist.objective import joint_objective
    from jrm_dist.processing import RewardProcessor

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"),
                      [f"model.name={args.backbone}", "model.lm_ce=auto", "model.attn_implementation=sdpa"])
    proc = RewardProcessor.from_pretrained(args.backbone, max_pixels=PACK_SIDE * PACK_SIDE, min_pixels=3136,
                                           max_length=2048)
    model = build_model(cfg, proc.reward_token_id, None)
    opt = build_optimizer(param_groups(model, cfg), cfg)
    cols = {"unpacked": Collator(proc), "packed": PackedCollator(proc)}
    res = {}
    for k in (2, 4):
        data = [packing_groups(proc, k, args.groups, seed=100 * k + s) for s in range(args.steps + 1)]
        times = {m: [] for m in cols}
        cpu = {m: [] for m in cols}  # process CPU time: less disturbed by the neighbours on a shared machine
        fwd = {m: {} for m in cols}
        stats = {m: {"tokens": 0.0, "padding": [], "images": 0, "pairs": 0} for m in cols}
        for i, groups in enumerate(data):
            order = list(cols) if i % 2 == 0 else list(cols)[::-1]  # interleave, alternate who goes first
            for m in order:
                tc = time.perf_counter()
                b = cols[m](groups)
                tc = time.perf_counter() - tc
                watch = _Stopwatch(model) if i >= 1 else None
                t0, c0 = time.perf_counter(), time.process_time()
                loss = joint_objective(model(b), b, cfg.loss, i)["loss"]
                t_fwd = time.perf_counter() - t0
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if watch is not None:
                    watch.close()
                    times[m].append(dt)
                    cpu[m].append(dc)
                    for name, v in watch.t.items():
                        fwd[m].setdefault(name, []).append(v)
                    fwd[m].setdefault("forward (all)", []).append(t_fwd)
                    fwd[m].setdefault("collate (not in step)", []).append(tc)
                    st = stats[m]
                    st["tokens"] += b["input_ids"].numel()
                    st["padding"].append(padding_stats(b)["padding_fraction"])
                    st["images"] += 0 if b["image_grid_thw"] is None else b["image_grid_thw"].shape[0]
                    st["pairs"] += int(b["win_idx"].numel())
        n = args.steps * args.groups
        res[k] = {m: {"step_s": statistics.median(times[m]),
                      "pairs_per_s": stats[m]["pairs"] / args.steps / statistics.median(times[m]),
                      "pairs_per_cpu_s": stats[m]["pairs"] / args.steps / statistics.median(cpu[m]),
                      "tokens_per_group": stats[m]["tokens"] / n,
                      "padding_fraction": statistics.mean(stats[m]["padding"]),
                      "images_per_group": stats[m]["images"] / n,
                      "forward_s": {name: statistics.median(v) for name, v in fwd[m].items()}}
                  for m in cols}
    print(json.dumps(res))


def bench_packing(args, tiny: str, tmp: Path) -> None:
    """Group packing vs today's padded rows, K=2 and K=4, on the full-vocabulary tiny model and on a
    small-vocabulary one whose LM-head share of the step matches 7B's."""
    small_vocab, share = lm_head_share_vocab(tiny)
    models = [(args.vocab or 151936, build_backbone(tiny, args.vocab or 151936, tmp)),
              (small_vocab, build_backbone(tiny, small_vocab, tmp))]
    for vocab, path in models:
        cmd = [sys.executable, __file__, "--packing-worker", "--backbone", path, "--groups", str(args.pack_groups),
               "--steps", str(args.pack_steps), "--threads", str(args.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if p.returncode != 0:
            raise SystemExit(f"packing worker failed:\n{p.stderr[-3000:]}")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        what = "full vocabulary" if vocab >= 100000 else f"LM-head share of 7B ({share:.1%})"
        print(f"\n== group packing, tiny Qwen2.5-VL, vocab {vocab} ({what}), {args.pack_groups} groups/step, "
              f"{PACK_SIDE}px source + candidate images, rationale {PACK_RATIONALE[0]}-{PACK_RATIONALE[1]} tokens, "
              f"median of {args.pack_steps} interleaved steps")
        for k in ("2", "4"):
            u, q = res[k]["unpacked"], res[k]["packed"]
            print(f"K={k}{'':24s}{'packed':>12s}{'unpacked':>12s}{'ratio':>9s}")
            for label, key, fmt in (("pairs/s", "pairs_per_s", "{:12.3f}"), ("step (s)", "step_s", "{:12.3f}"),
                                    ("pairs per CPU-second", "pairs_per_cpu_s", "{:12.3f}"),
                                    ("tokens per group", "tokens_per_group", "{:12.0f}"),
                                    ("padding fraction", "padding_fraction", "{:12.3f}"),
                                    ("images encoded per group", "images_per_group", "{:12.2f}")):
                r = q[key] / u[key] if u[key] else float("nan")
                print(f"  {label:26s}" + fmt.format(q[key]) + fmt.format(u[key]) + f"{r:8.2f}x")
            for part in sorted(set(q["forward_s"]) | set(u["forward_s"])):
                a, b = q["forward_s"].get(part, 0.0), u["forward_s"].get(part, 0.0)
                print(f"  fwd {part:22s}{a:12.3f}{b:12.3f}{(a / b if b else float('nan')):8.2f}x")
            tag = f"K={k}, vocab {vocab}"
            emit(f"train: packed vs unpacked pairs/s, {tag}", q["pairs_per_s"], u["pairs_per_s"], "pairs/s", True,
                 f"target >= {'1.3' if k == '2' else '1.6'}x; {PACK_SIDE}px images, rationale 50-250 tokens")
            emit(f"train: packed vs unpacked pairs per process CPU-second, {tag}", q["pairs_per_cpu_s"],
                 u["pairs_per_cpu_s"], "pairs/cpu-s", True, "same steps timed by process CPU time")
            emit(f"train: packed vs unpacked tokens per group, {tag}", q["tokens_per_group"], u["tokens_per_group"],
                 "tokens", False, f"padding fraction {q['padding_fraction']:.3f} vs {u['padding_fraction']:.3f}")
            emit(f"train: packed vs unpacked images encoded per group, {tag}", q["images_per_group"],
                 u["images_per_group"], "images", False)


def rank_only_vs_lm(args) -> None:
    """Step time of the rank-only path (alpha = 0: no rationale tokens, LM head frozen and not called)
    vs the same config with LM labels at alpha = 0.3, same backbone, same groups, in this process."""
    import torch

    from data_prep.synthetic import make_group
    from jrm_dist.config import load_config
    from jrm_dist.data.collate import Collator, encode_group
    from jrm_dist.engine import build_model, build_optimizer, param_groups
    from jrm_dist.objective import drop_lm, joint_objective
    from jrm_dist.processing import RewardProcessor

    torch.set_num_threads(args.threads)
    proc = RewardProcessor.from_pretrained(args.backbone, max_pixels=3136, min_pixels=784, max_length=512)
    col = Collator(proc)
    res = {}
    for alpha in (0.0, 0.3):
        torch.manual_seed(0)
        cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"model.name={args.backbone}", f"loss.alpha={alpha}"])
        data = [col([encode_group(proc, *make_group(0, s * args.groups + g), use_rationale=alpha > 0)
                     for g in range(args.groups)]) for s in range(args.steps + 1)]
        model = build_model(cfg, proc.reward_token_id, None)
        opt = build_optimizer(param_groups(model, cfg), cfg)
        for i, b in enumerate(data):
            if i == 1:
                t0 = time.perf_counter()
            b = drop_lm(b, cfg.loss, i)
            loss = joint_objective(model(b), b, cfg.loss, i)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        res[alpha] = (time.perf_counter() - t0) / args.steps
        del model, opt
    print(f"\n== rank-only step (alpha=0) vs joint step with LM labels (alpha=0.3), {args.groups} groups x K=2")
    print(f"{'step time (ms)':28s}{res[0.0] * 1e3:14.1f}{res[0.3] * 1e3:18.1f}{res[0.0] / res[0.3]:9.2f}x")
    emit("train: rank-only (alpha=0) step time vs with LM labels (alpha=0.3)", res[0.0] * 1e3, res[0.3] * 1e3, "ms",
         False, "alpha=0: no rationale tokens, LM head frozen and not called")


if __name__ == "__main__":
    main()
