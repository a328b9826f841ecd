"""A learnable synthetic edit-preference task with real PNG images and templated rationales.

Task: the source image is a grey square on a light background; the instruction asks to make the
square one colour; each candidate is the same square painted in a different colour. The candidate
with the asked colour scores high. A tiny model can learn it (compare the asked colour word with
the candidate's pixels), so training curves on it mean something, and it needs no download.

Everything is a pure function of (seed, index): the training loop can build groups in memory and
``jrm-prep synthetic`` writes the same groups to shards.
"""
from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw

from jrm_dist.data.schema import SCHEMA_VERSION, ranking_from_scores, validate_group

# Common English colour words (the tiny tokenizer knows them) with clearly distinct RGB values.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 40, 170),
}
COLOURS = tuple(PALETTE)
BACKGROUND = (225, 225, 225)
SOURCE_GREY = (128, 128, 128)


def _png(size: int, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> bytes:
    """Encode one square as PNG; Pillow's PNG encoder is deterministic for the same pixels."""
    im = Image.new("RGB", (size, size), BACKGROUND)
    ImageDraw.Draw(im).rectangle(box, fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def rationale_for(asked: str, painted: str) -> str:
    """Templated critique of one candidate (LM supervision for the joint model)."""
    if asked == painted:
        return f"The square is now {painted}, as the instruction asked, so the edit follows it."
    return f"The square is now {painted}; the instruction asked for {asked}, so the edit does not follow it."


def make_group(seed: int, index: int, k: int = 2, size: int = 56) -> tuple[dict, dict[str, bytes]]:
    """Return (record, images): a valid schema record (key, instruction, source_images, candidates with
    images/scores/rationale, ranking) and the PNG bytes for every image field it names."""
    if not 2 <= k <= len(COLOURS):
        raise ValueError(f"k must be in 2..{len(COLOURS)}, got {k}")
    if size < 8:
        raise ValueError(f"size must be >= 8 px, got {size}")
    rng = random.Random(f"jrm-synthetic:{seed}:{index}")
    colours = rng.sample(COLOURS, k)  # distinct colours; colours[0] is the asked one
    asked = colours[0]
    rng.shuffle(colours)
    # Square position and size vary per group (same box in source and candidates).
    side = rng.randint(size // 3, size * 2 // 3)
    x0 = rng.randint(0, size - side)
    y0 = rng.randint(0, size - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)

    images = {"src0.png": _png(size, box, SOURCE_GREY)}
    candidates = []
    for c, colour in enumerate(colours):
        field = f"c{c}_0.png"
        images[field] = _png(size, box, PALETTE[colour])
        follows = colour == asked
        instr = 4.0 if follows else 1.0
        quality = float(rng.choice((3, 4)))
        candidates.append({
            "id": f"c{c}",
            "images": [field],
            "text": None,
            "model": "synthetic",
            "scores": {"instruction_following": instr, "quality_aesthetic": quality, "overall": instr + quality},
            "rationale": rationale_for(asked, colour),
        })
    record = {
        "schema_version": SCHEMA_VERSION,
        "key": f"syn-{seed}-{index:08d}",
        "instruction": f"make the square {asked}",
        "source_images": ["src0.png"],
        "candidates": candidates,
        "ranking": ranking_from_scores([c["scores"]["overall"] for c in candidates]),
        "rationale": None,
        "source": "synthetic",
        "meta": {"seed": seed, "index": index, "asked": asked, "colours": colours},
    }
    validate_group(record, set(images))
    return record, images
