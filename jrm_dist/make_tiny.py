"""``jrm-make-tiny``: build the tiny offline Qwen2.5-VL backbone (random weights, :mod:`jrm_dist.backbones`), or
with ``--pretrain`` pre-train a larger one as a plain VLM (:mod:`jrm_dist.pretrain`).

The command line lives here so the imports go one way only: make_tiny -> pretrain -> backbones.
"""
from __future__ import annotations

import argparse

from jrm_dist.backbones import build_tiny_backbone


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Build the tiny offline Qwen2.5-VL backbone used by tests and the demo "
                                 "(random weights), or with --pretrain a larger one pre-trained as a plain VLM")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=None, help="text hidden size (default 64; 128 with --pretrain)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 2; 4 with --pretrain)")
    ap.add_argument("--pretrain", action="store_true",
                    help="pre-train on synthetic captions / Q&A (jrm_dist.pretrain); reused when already done")
    ap.add_argument("--steps", type=int, default=500, help="--pretrain: optimizer steps")
    ap.add_argument("--batch-size", type=int, default=48, help="--pretrain: samples per step")
    ap.add_argument("--yes-no", action="store_true",
                    help="--pretrain: add 'Is the square <colour>?' questions (read a colour word, check the image)")
    ap.add_argument("--threads", type=int, default=1, help="--pretrain: torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--tokenizer", choices=("tiny", "real"), default="tiny",
                    help="real: the real Qwen2.5-VL tokenizer and the released 152064 vocabulary rows "
                         "(jrm-make-tokenizer); not with --pretrain")
    a = ap.parse_args(argv)
    if a.pretrain and a.tokenizer != "tiny":
        ap.error("--tokenizer real is not supported with --pretrain (it trains its own tokenizer on the captions)")
    if a.pretrain:
        from jrm_dist.pretrain import pretrain_tiny_backbone  # data_prep and PIL: only when pre-training

        print(pretrain_tiny_backbone(a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed,
                                     hidden=a.hidden or 128, layers=a.layers or 4, threads=a.threads,
                                     yes_no=a.yes_no))
        return
    print(build_tiny_backbone(a.out, seed=a.seed, hidden=a.hidden or 64, layers=a.layers or 2, tokenizer=a.tokenizer))


if __name__ == "__main__":
    main()
