"""Pre-train the tiny Qwen2.5-VL as a plain VLM, offline, in a few CPU minutes.

    jrm-make-tiny --pretrain --out runs/tiny-pretrained [--steps 1500] [--seed 0]

Why: JRM's claim is about *pretrained* VLMs: rationale supervision keeps a representation that already
describes images rich, and the reward head benefits. A random-init tiny backbone has nothing to keep.
This gives the toy backbone what a real one has before preference training: it captions the synthetic
squares (colour, position, size, noise) and answers short questions about them, for one image or for
the last of two (the layout of an edit: source, then result).

Data: the image generator of ``data_prep/synthetic.py`` (same palette, background, speckle noise), plus
the grey source square; a fresh random image for every sample (seeded), held-out images from another seed.
Training: plain torch, one process, AdamW, cross-entropy on the answer tokens only.
Output: a normal HF checkpoint directory (model, tokenizer, image processor) and ``pretrain_eval.json``
with held-out accuracy (colour word right in greedy captions, and exact answers per question).
A complete directory (``pretrain_eval.json`` present) is reused as is.
"""
from __future__ import annotations

import io
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from data_prep.synthetic import NOISE_BY_QUALITY, PALETTE, QUALITY_WORDS, SOURCE_GREY, _png, _speckle

EVAL_FILE = "pretrain_eval.json"
IMAGE_SIZE = 56
COLOUR_WORDS = {**PALETTE, "grey": SOURCE_GREY}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")
QUESTIONS = {
    "caption": "Describe the image.",
    "colour": "What colour is the square?",
    "position": "Where is the square?",
    "size": "How big is the square?",
    "noise": "Is the image clean or noisy?",
}
LAST = " Answer about the last image."


YES_NO = "Is the square {}?"


def caption_corpus(yes_no: bool = False) -> list[str]:
    """Sentences that put every caption / answer word into the tiny tokenizer's BPE vocabulary."""
    out = [QUESTIONS[k] + LAST for k in QUESTIONS]
    if yes_no:
        out += [YES_NO.format(c) + " yes no" for c in COLOUR_WORDS]
    for c in COLOUR_WORDS:
        for r in ROWS:
            out.append(f"A large {c} square at the {r} left, clean. A small {c} square, medium, noisy.")
            out.append(f"{c} {r} centre right slightly speckled covered in noise make the square {c}")
    return out


@dataclass
class Sample:
    images: list[bytes]
    question: str
    answer: str
    kind: str
    colour: str


def _position(box, size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row = ROWS[min(int(3 * cy / size), 2)]
    col = COLS[min(int(3 * cx / size), 2)]
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def _size_word(side: int, size: int) -> str:
    f = side / size
    return "small" if f < 0.43 else ("medium" if f < 0.55 else "large")


def make_sample(rng: random.Random, size: int = IMAGE_SIZE, yes_no: bool = False) -> Sample:
    """One image (or source + edited pair) and a caption or a question with its answer. ``yes_no`` adds
    "Is the square <colour>?" questions (half true): reading a colour word in the prompt and checking
    it against the image, which the other questions never ask for."""
    colour = rng.choice(list(COLOUR_WORDS))
    quality = rng.choice(list(NOISE_BY_QUALITY))
    side = rng.randint(size // 3, size * 2 // 3)  # the same range as the preference task
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    img = _speckle(_png(size, box, COLOUR_WORDS[colour]), NOISE_BY_QUALITY[quality], rng)
    images = [img]
    two = rng.random() < 0.35
    if two:  # an edit's layout: the grey source first, the result last
        images = [_png(size, box, SOURCE_GREY), img]
    pos, sz, noise = _position(box, size), _size_word(side, size), QUALITY_WORDS[quality]
    kinds = ("caption", "caption", "colour", "colour", "position", "size", "noise")
    kind = rng.choice(kinds + (("yes_no",) * 3 if yes_no else ()))
    if kind == "yes_no":
        named = colour if rng.random() < 0.5 else rng.choice([c for c in COLOUR_WORDS if c != colour])
        return Sample(images, YES_NO.format(named) + (LAST if two else ""), "yes" if named == colour else "no",
                      kind, colour)
    answer = {"caption": f"A {sz} {colour} square at the {pos}, {noise}.", "colour": colour, "position": pos,
              "size": sz, "noise": noise}[kind]
    return Sample(images, QUESTIONS[kind] + (LAST if two else ""), answer, kind, colour)


class Encoder:
    """Chat-template encoding of (images, question) → prompt ids, as the RewardProcessor lays out a user
    turn (image placeholders expanded to their merged-patch counts), plus answer ids as labels."""

    def __init__(self, tokenizer, image_processor):
        self.tok, self.ip = tokenizer, image_processor
        self.image_token = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.merge = int(getattr(image_processor, "merge_size", 2))
        self.eos = tokenizer.eos_token

    def prompt(self, images: list[bytes], question: str):
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        out = self.ip(images=pil, return_tensors="pt")
        pv, grid = out["pixel_values"], out["image_grid_thw"]
        content = [{"type": "image"}] * len(pil) + [{"type": "text", "text": question}]
        text = self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=True)
        parts = text.split(self.image_token)
        counts = (grid.prod(-1) // self.merge ** 2).tolist()
        text = parts[0] + "".join(self.image_token * n + p for n, p in zip(counts, parts[1:]))
        return self.tok(text, add_special_tokens=False)["input_ids"], pv, grid

    def batch(self, samples: list[Sample], with_answer: bool = True) -> dict:
        rows, labels, pvs, grids = [], [], [], []
        for s in samples:
            ids, pv, grid = self.prompt(s.images, s.question)
            ans = self.tok(" " + s.answer + self.eos, add_special_tokens=False)["input_ids"] if with_answer else []
            rows.append(ids + ans)
            labels.append([-100] * len(ids) + ans)
            pvs.append(pv)
            grids.append(grid)
        return self.collate(rows, labels, pvs, grids)

    def collate(self, rows, labels, pvs, grids, left_pad: bool = False) -> dict:
        T = max(map(len, rows))
        pad = self.tok.pad_token_id
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        lab = torch.full((len(rows), T), -100, dtype=torch.long)
        att = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (r, l) in enumerate(zip(rows, labels)):
            sl = slice(T - len(r), T) if left_pad else slice(0, len(r))
            ids[i, sl] = torch.tensor(r)
            lab[i, sl] = torch.tensor(l)
            att[i, sl] = 1
        return {"input_ids": ids, "attention_mask": att, "labels": lab,
                "mm_token_type_ids": (ids == self.image_token_id).to(torch.int32),
                "pixel_values": torch.cat(pvs), "image_grid_thw": torch.cat(grids)}


@torch.no_grad()
def greedy_answers(model, enc: Encoder, samples: list[Sample], max_new: int = 16) -> list[str]:
    """Greedy decoding without a KV cache (tiny model, short answers), left-padded batch."""
    prompts, pvs, grids = [], [], []
    for s in samples:
        ids, pv, grid = enc.prompt(s.images, s.question)
        prompts.append(ids)
        pvs.append(pv)
        grids.append(grid)
    seqs = [list(p) for p in prompts]
    done = [False] * len(seqs)
    eos = enc.tok.convert_tokens_to_ids(enc.eos)
    banned = [enc.tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                          "<|vision_end|>")]
    for _ in range(max_new):
        b = enc.collate(seqs, [[-100] * len(s) for s in seqs], pvs, grids, left_pad=True)
        b.pop("labels")
        logits = model(**b, use_cache=False).logits[:, -1]
        logits[:, banned] = float("-inf")  # a generated image placeholder would have no image features
        nxt = logits.argmax(-1).tolist()
        for i, t in enumerate(nxt):
            if not done[i]:
                seqs[i].append(t)
                done[i] = t == eos
            else:
                seqs[i].append(enc.tok.pad_token_id)
        if all(done):
            break
    out = []
    for p, s in zip(prompts, seqs):
        gen = [t for t in s[len(p):] if t not in (eos, enc.tok.pad_token_id)]
        out.append(enc.tok.decode(gen).strip())
    return out


def evaluate(model, enc: Encoder, n: int = 256, seed: int = 10_000, yes_no: bool = False) -> dict:
    """Held-out images (another seed): colour word right in greedy captions (and no other colour word),
    and exact-match accuracy per question kind."""
    rng = random.Random(f"jrm-pretrain-eval:{seed}")
    samples = [make_sample(rng, yes_no=yes_no) for _ in range(n)]
    model.eval()
    answers = []
    for i in range(0, n, 64):
        answers += greedy_answers(model, enc, samples[i:i + 64])
    model.train()
    per_kind: dict[str, list[int]] = {}
    cap_colour = []
    for s, a in zip(samples, answers):
        per_kind.setdefault(s.kind, []).append(int(a == s.answer))
        if s.kind == "caption":
            words = set(a.replace(",", " ").replace(".", " ").split())
            cap_colour.append(int(s.colour in words and not (words & (set(COLOUR_WORDS) - {s.colour}))))
    res = {"heldout_samples": n, "caption_colour_accuracy": sum(cap_colour) / max(len(cap_colour), 1),
           "captions": len(cap_colour),
           **{f"exact/{k}": sum(v) / len(v) for k, v in sorted(per_kind.items())},
           "examples": [{"question": s.question, "answer": s.answer, "generated": a}
                        for s, a in list(zip(samples, answers))[:8]]}
    return res


def pretrain_tiny_backbone(out_dir: str | Path, steps: int = 500, batch_size: int = 48, lr: float = 2e-3,
                           seed: int = 0, hidden: int = 128, layers: int = 4, vision_hidden: int = 64,
                           eval_samples: int = 256, log_every: int = 100, threads: int | None = None,
                           yes_no: bool = False) -> Path:
    """Build a (larger) tiny Qwen2.5-VL with a caption-aware tokenizer, pre-train it, evaluate, save.
    Reuses ``out_dir`` when it holds a finished pre-training (``pretrain_eval.json``)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from jrm_dist.backbones import build_tiny_tokenizer, tiny_config

    out = Path(out_dir)
    if (out / EVAL_FILE).exists() and (out / "config.json").exists():
        print(f"[pretrain] reusing {out} ({EVAL_FILE} present)")
        return out
    if threads:
        torch.set_num_threads(threads)
    t_start = time.time()
    tok = build_tiny_tokenizer(extra_corpus=caption_corpus(yes_no))
    cfg = tiny_config(tok, hidden=hidden, layers=layers, vision_hidden=vision_hidden)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).float()
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112)
    enc = Encoder(tok, ip)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(steps - warm, 1))))
    rng = random.Random(f"jrm-pretrain:{seed}")
    model.train()
    ema = None
    for step in range(1, steps + 1):
        b = enc.batch([make_sample(rng, yes_no=yes_no) for _ in range(batch_size)])
        loss = model(**b, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % log_every == 0 or step == steps:
            print(f"[pretrain] step {step}/{steps} loss {ema:.4f} ({time.time() - t_start:.0f}s)", flush=True)
    res = evaluate(model, enc, n=eval_samples, yes_no=yes_no)
    res.update({"yes_no": yes_no, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "hidden": hidden, "layers": layers,
                "vision_hidden": vision_hidden, "final_loss_ema": ema, "seconds": round(time.time() - t_start, 1),
                "parameters": sum(p.numel() for p in model.parameters())})
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    ip.save_pretrained(tmp)
    (tmp / EVAL_FILE).write_text(json.dumps(res, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    print(f"[pretrain] held-out caption colour accuracy {res['caption_colour_accuracy']:.3f} "
          f"({res['captions']} captions); exact answers: "
          + ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in res.items() if k.startswith("exact/"))
          + f"; {res['seconds']:.0f}s -> {out / EVAL_FILE}", flush=True)
    return out
