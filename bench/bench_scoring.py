"""Pairs/s of reward-only scoring (JRM at inference: reward head on the prompt, LM path off) vs the same
model generating a rationale first and then scoring (the generative-judge path JRM replaces).

    python bench/bench_scoring.py                       # tiny offline model, CPU
    python bench/bench_scoring.py --model HF_DIR --device cuda --pairs 64 --new-tokens 256

Both paths see the same pairs, batch size and model; the generative path is forced to write exactly
``--new-tokens`` tokens (min = max) so its cost does not depend on when a random model emits <eos>.
Prints both rates side by side and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _result import emit  # noqa: E402
from jrm_dist.eval.common import Scorer  # noqa: E402
from jrm_dist.explain import generate_critiques  # noqa: E402

COLOURS = [(220, 30, 30), (30, 170, 40), (30, 60, 220), (240, 220, 30), (140, 40, 170), (245, 140, 20)]


def square(rgb, size: int) -> Image.Image:
    im = Image.new("RGB", (size, size), (225, 225, 225))
    ImageDraw.Draw(im).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=rgb)
    return im


def make_pairs(n: int, size: int) -> list[tuple[str, Image.Image, Image.Image, Image.Image]]:
    src = square((128, 128, 128), size)
    return [(f"make the square {['red', 'green', 'blue', 'yellow', 'purple', 'orange'][i % 6]}", src,
             square(COLOURS[i % 6], size), square(COLOURS[(i + 1) % 6], size)) for i in range(n)]


def tiny_model(workdir: Path) -> str:
    from jrm_dist.backbones import build_tiny_backbone
    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import RewardProcessor

    bb = build_tiny_backbone(workdir / "backbone")
    proc = RewardProcessor.from_pretrained(str(bb))
    model = JointRewardModel.from_backbone(str(bb), proc.reward_token_id, head_hidden=32)
    model.save_pretrained(workdir / "jrm", proc)
    return str(workdir / "jrm")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(scorer: Scorer, pairs, batch: int, new_tokens: int, generate: bool) -> float:
    """Seconds to judge every pair (encode + forward [+ generate]); both candidates of a pair per batch."""
    sync(scorer.device)
    t0 = time.perf_counter()
    cands = [(ins, src, c) for ins, src, a, b in pairs for c in (a, b)]
    for i in range(0, len(cands), batch):
        enc = [scorer.encode(ins, [src], [c]) for ins, src, c in cands[i: i + batch]]
        if generate:
            generate_critiques(scorer, enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        scorer.score_encoded(enc)
    sync(scorer.device)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="JRM checkpoint (default: build the tiny offline one)")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8, help="candidates per forward / generate call")
    ap.add_argument("--new-tokens", type=int, default=64, help="rationale length for the generative path")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or tiny_model(Path(tmp))
        scorer = Scorer(model, batch_size=a.batch_size, device=a.device, dtype=a.dtype)
        pairs = make_pairs(a.pairs, a.image_size)
        run(scorer, pairs[:2], a.batch_size, 4, False)  # warm-up both paths
        run(scorer, pairs[:2], a.batch_size, 4, True)
        t_rm = statistics.median(run(scorer, pairs, a.batch_size, a.new_tokens, False) for _ in range(a.repeats))
        t_gen = statistics.median(run(scorer, pairs, a.batch_size, a.new_tokens, True) for _ in range(a.repeats))

    rm, gen = a.pairs / t_rm, a.pairs / t_gen
    print(f"model={model if a.model else 'tiny offline Qwen2.5-VL'} device={scorer.device} dtype={a.dtype} "
          f"pairs={a.pairs} batch={a.batch_size} image={a.image_size}px rationale={a.new_tokens} tokens "
          f"threads={torch.get_num_threads()} (median of {a.repeats})")
    print(f"{'path':<34}{'pairs/s':>10}{'s/pair':>10}")
    print(f"{'reward-only (JRM inference)':<34}{rm:>10.2f}{1 / rm:>10.4f}")
    print(f"{'rationale first, then score':<34}{gen:>10.2f}{1 / gen:>10.4f}")
    print(f"ratio reward-only / generative: {rm / gen:.1f}x")
    emit("scoring: reward-only vs rationale-first", rm, gen, "pairs/s", True, "baseline = generative judge path")


if __name__ == "__main__":
    main()
