"""The record schema of one training/eval sample ("group"), shared by data_prep (writer) and the
loader (reader). One place: change SCHEMA_VERSION when the layout changes.

A shard sample is a webdataset entry with
  ``__key__``      the group key (no dots: webdataset splits field names at the first dot),
  ``json``         the group record below (utf-8 JSON),
  ``src{i}.{ext}`` source image bytes, ``c{k}_{j}.{ext}`` image j of candidate k (original bytes
                   unless data_prep was asked to re-encode with --max-pixels).

Group record::

    {"schema_version": 1, "key": str, "instruction": str,
     "source_images": ["src0.png", ...],                 # field names inside the sample
     "candidates": [{"id": str, "images": ["c0_0.png"], "text": str | None, "model": str | None,
                     "scores": {"overall": float, ...}, "rationale": str | None}, ...],   # K >= 2
     "ranking": [[0], [1, 2]] | None,                    # tiers, best first; ties share a tier
     "rationale": str | None,                            # group-level critique (LM supervision)
     "source": str, "meta": {...}}

When ``ranking`` is absent, the order comes from ``candidates[*].scores[rank_by]`` (equal → tie).
"""
from __future__ import annotations

import math
import re
from typing import Any

SCHEMA_VERSION = 1
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
SCORE_DIMENSIONS = ("overall", "instruction_following", "quality_aesthetic")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_RECORD_FIELD_RE = re.compile(r"^(json|src\d+\.\w+|c\d+_\d+\.\w+)$")


class SchemaError(ValueError):
    """A record that does not follow the schema; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def is_record_field(field: str) -> bool:
    """Whether a shard member's field (the name after the key) is one a record has: ``json``, ``src{i}.{ext}``
    or ``c{k}_{j}.{ext}``. The loader tells the members of a broken record (they hold a position of the
    shard) from stray files this way."""
    return bool(_RECORD_FIELD_RE.match(field))


def sanitize_key(key: str) -> str:
    """Webdataset keys may not contain dots or slashes; map anything odd to '_'."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", str(key))


def ranking_from_scores(scores: list[float]) -> list[list[int]]:
    """Tiers (best first) from per-candidate scores; equal scores share a tier (a tie)."""
    order = sorted(set(scores), reverse=True)
    return [[i for i, s in enumerate(scores) if s == v] for v in order]


def group_ranking(rec: dict[str, Any], rank_by: str = "overall") -> list[list[int]]:
    """The ranking tiers of a record: explicit ``ranking`` first, else derived from scores."""
    if rec.get("ranking"):
        return [list(t) for t in rec["ranking"]]
    scores = []
    for k, c in enumerate(rec["candidates"]):
        s = (c.get("scores") or {}).get(rank_by)
        if s is None:
            raise SchemaError("missing_field", f"candidate {k} has no ranking and no score '{rank_by}'")
        scores.append(float(s))
    return ranking_from_scores(scores)


def validate_group(rec: dict[str, Any], fields: set[str] | None = None) -> None:
    """Raise SchemaError naming the field when ``rec`` is not a valid group record.

    ``fields`` are the field names present in the shard sample; when given, every image the record
    names must be among them.
    """
    for name in ("key", "instruction", "candidates"):
        if name not in rec or rec[name] is None:
            raise SchemaError("missing_field", f"field '{name}' is missing")
    if not _KEY_RE.match(str(rec["key"])):
        raise SchemaError("bad_key", f"key {rec['key']!r} has characters other than [A-Za-z0-9_-]")
    if not isinstance(rec["instruction"], str):
        raise SchemaError("wrong_type", "field 'instruction' must be a string")
    cands = rec["candidates"]
    if not isinstance(cands, list) or len(cands) < 2:
        raise SchemaError("too_few_candidates", f"K={len(cands) if isinstance(cands, list) else 0} < 2")
    for k, c in enumerate(cands):
        if not c.get("images") and not c.get("text"):
            raise SchemaError("missing_field", f"candidate {k} has neither images nor text")
        for dim, v in (c.get("scores") or {}).items():
            if v is None or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise SchemaError("score_out_of_range", f"candidate {k} score '{dim}'={v!r} is not a finite number")
    ranking = rec.get("ranking")
    if ranking:
        flat = sorted(i for tier in ranking for i in tier)
        if flat != list(range(len(cands))):
            raise SchemaError("bad_ranking", f"ranking {ranking} is not a partition of 0..{len(cands) - 1}")
    if fields is not None:
        names = list(rec.get("source_images") or []) + [n for c in cands for n in (c.get("images") or [])]
        for n in names:
            if n not in fields:
                raise SchemaError("missing_image", f"image field '{n}' is not in the sample")
