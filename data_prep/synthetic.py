"""A learnable synthetic edit-preference task with real PNG images and templated rationales.

Task: the source image is a grey square on a light background; the instruction asks to make the
square one colour. Two kinds of group, mirroring EditReward's score dimensions:

* ``colour`` groups (instruction following): each candidate paints the square a different colour,
  cleanly; the one with the asked colour wins. Learning it means binding the colour word to the
  candidate's pixels — the harder half for a tiny random model.
* ``quality`` groups (quality/aesthetic): every candidate paints the asked colour, but with
  different amounts of grey speckle noise; the cleanest wins. Visible in the image alone, so even a
  tiny model learns it within a few dozen steps and the demo's accuracy rises above chance.

``overall`` = instruction_following + quality_aesthetic decides the ranking (equal → tie).

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


# quality score → fraction of pixels replaced by grey speckles (4 = clean)
NOISE_BY_QUALITY = {4.0: 0.0, 3.0: 0.08, 2.0: 0.25, 1.0: 0.5}
QUALITY_WORDS = {4.0: "clean", 3.0: "slightly speckled", 2.0: "noisy", 1.0: "covered in noise"}


def _speckle(png: bytes, fraction: float, rng: random.Random) -> bytes:
    """Replace ``fraction`` of the pixels by random greys (never a palette colour); deterministic."""
    if fraction <= 0:
        return png
    im = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = im.size
    px = im.load()
    for _ in range(int(fraction * w * h)):
        v = rng.randrange(256)
        px[rng.randrange(w), rng.randrange(h)] = (v, v, v)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


RATIONALE_STYLES = ("default", "verdict_first")


def rationale_for(asked: str, painted: str, quality: float = 4.0, style: str = "default") -> str:
    """Templated critique of one candidate (LM supervision for the joint model).

    ``verdict_first`` opens with the verdict and names the painted colour next to the asked one, so the
    first rationale tokens (predicted from the end of the prompt, right after the reward token) carry
    exactly what the reward needs; ``default`` describes first and concludes last."""
    if style not in RATIONALE_STYLES:
        raise ValueError(f"rationale style {style!r}: expected one of {RATIONALE_STYLES}")
    look = QUALITY_WORDS[quality]
    if style == "verdict_first":
        if asked != painted:
            return f"Does not follow: the square is {painted}, not {asked}. The image is {look}."
        verdict = "Follows" if quality == 4.0 else "Follows but degraded"
        return f"{verdict}: the square is {painted}, as asked. The image is {look}."
    if asked == painted:
        verdict = {4.0: "so the edit follows it", 3.0: "but the result is slightly degraded"}.get(
            quality, "but the image quality is poor")
        return f"The square is now {painted}, as the instruction asked, and the image is {look}, {verdict}."
    return (f"The square is now {painted}; the instruction asked for {asked}, so the edit does not follow it. "
            f"The image is {look}.")


def make_group(seed: int, index: int, k: int = 2, size: int = 56,
               quality_share: float = 0.5, rationale_style: str = "default") -> tuple[dict, dict[str, bytes]]:
    """Return (record, images): a valid schema record (key, instruction, source_images, candidates with
    images/scores/rationale, ranking) and the PNG bytes for every image field it names."""
    if not 2 <= k <= len(COLOURS):
        raise ValueError(f"k must be in 2..{len(COLOURS)}, got {k}")
    if size < 8:
        raise ValueError(f"size must be >= 8 px, got {size}")
    rng = random.Random(f"jrm-synthetic:{seed}:{index}")
    kind = "quality" if rng.random() < quality_share else "colour"
    colours = rng.sample(COLOURS, k)  # distinct colours; colours[0] is the asked one
    asked = colours[0]
    rng.shuffle(colours)
    if kind == "quality":  # everyone paints the asked colour; distinct noise levels (ties beyond K = 4)
        colours = [asked] * k
        qualities = [float(4 - (i % 4)) for i in range(k)]
        rng.shuffle(qualities)
    else:
        qualities = [4.0] * k
    # Square position and size vary per group (same box in source and candidates).
    side = rng.randint(size // 3, size * 2 // 3)
    x0 = rng.randint(0, size - side)
    y0 = rng.randint(0, size - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)

    images = {"src0.png": _png(size, box, SOURCE_GREY)}
    candidates = []
    for c, (colour, quality) in enumerate(zip(colours, qualities)):
        field = f"c{c}_0.png"
        images[field] = _speckle(_png(size, box, PALETTE[colour]), NOISE_BY_QUALITY[quality], rng)
        instr = 4.0 if colour == asked else 1.0
        candidates.append({
            "id": f"c{c}",
            "images": [field],
            "text": None,
            "model": "synthetic",
            "scores": {"instruction_following": instr, "quality_aesthetic": quality, "overall": instr + quality},
            "rationale": rationale_for(asked, colour, quality, rationale_style),
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
        "meta": {"seed": seed, "index": index, "kind": kind, "asked": asked, "colours": colours},
    }
    validate_group(record, set(images))
    return record, images
