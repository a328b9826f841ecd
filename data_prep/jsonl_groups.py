"""Generic JSONL of groups (one JSON object per line) -> shard samples.

The format a user writes by hand or exports from a teacher model (documented in data_prep/README.md)::

    {"key": "g1", "instruction": "make the sky purple",
     "source_images": ["src/g1.png"],
     "candidates": [
        {"id": "a", "images": ["out/g1_a.png"], "model": "m1",
         "scores": {"overall": 7}, "rationale": "The sky is purple and nothing else changed."},
        {"id": "b", "images": ["out/g1_b.png"], "model": "m2", "scores": {"overall": 4}}],
     "ranking": [[0], [1]], "rationale": null, "meta": {"anything": "kept as is"}}

Image paths are relative to ``--images`` (default: the JSONL file's folder). ``ranking`` lists tiers
best first (ties share a tier); without it the loader ranks by ``scores.overall``.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from jrm_dist.data.schema import SCHEMA_VERSION, SchemaError, sanitize_key, validate_group

from .images import check_image, read_image_file
from .jsonl_text import parse_line, read_lines
from .writer import Item, Result, dump_record


def count_lines(files: list[str]) -> int:
    n = 0
    for path in files:
        with open(path, "rb") as f:
            n += sum(1 for _ in f)
    return n


def iter_items(files: list[str], skip: int = 0) -> Iterator[Item]:
    """Every physical line is one input position (blank lines are positions that hold no record)."""
    index = 0
    for path in files:
        for lineno, line in read_lines(path):
            if index >= skip and line.strip():
                yield Item(index=index, file=path, locator={"line": lineno}, key=None, payload=line)
            index += 1


def _str_list(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SchemaError("wrong_type", f"field '{field}' must be a list of image paths")
    return value


def _opt_str(value: Any, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise SchemaError("wrong_type", f"field '{field}' must be a string or null")
    return value


def convert(item: Item, images_root: str | None = None, max_pixels: int | None = None,
            allow_outside: bool = False) -> Result:
    obj = parse_line(item.payload)
    if not isinstance(obj, dict):
        raise SchemaError("wrong_type", "line is not a JSON object")
    if obj.get("key") is None:
        raise SchemaError("missing_field", "field 'key' is missing")
    raw_key = str(obj["key"])
    item.key = raw_key
    key = sanitize_key(raw_key)
    if not isinstance(obj.get("instruction"), str):
        raise SchemaError("missing_field" if obj.get("instruction") is None else "wrong_type",
                          "field 'instruction' is missing or not a string")
    cands = obj.get("candidates")
    if cands is None:
        raise SchemaError("missing_field", "field 'candidates' is missing")
    if not isinstance(cands, list) or not all(isinstance(c, dict) for c in cands):
        raise SchemaError("wrong_type", "field 'candidates' must be a list of objects")
    if len(cands) < 2:
        raise SchemaError("too_few_candidates", f"K={len(cands)} < 2")
    root = images_root or os.path.dirname(os.path.abspath(item.file))
    sample: dict[str, bytes] = {"__key__": key}

    def add(path: str, field: str, base: str) -> str:
        data, ext = check_image(read_image_file(path, root, field, allow_outside), field, max_pixels)
        name = f"{base}.{ext}"
        sample[name] = data
        return name

    sources = [add(p, f"source_images[{i}]", f"src{i}")
               for i, p in enumerate(_str_list(obj.get("source_images", obj.get("source_image")), "source_images"))]
    out_cands = []
    for k, c in enumerate(cands):
        imgs = [add(p, f"candidates[{k}].images[{j}]", f"c{k}_{j}")
                for j, p in enumerate(_str_list(c.get("images", c.get("image")), f"candidates[{k}].images"))]
        scores = c.get("scores") or {}
        if not isinstance(scores, dict):
            raise SchemaError("wrong_type", f"field 'candidates[{k}].scores' must be an object")
        for dim, v in scores.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SchemaError("score_out_of_range", f"candidates[{k}].scores.{dim}={v!r} is not a number")
        out_cands.append({
            "id": str(c.get("id", k)),
            "images": imgs,
            "text": _opt_str(c.get("text"), f"candidates[{k}].text"),
            "model": _opt_str(c.get("model"), f"candidates[{k}].model"),
            "scores": {str(d): float(v) for d, v in scores.items()},
            "rationale": _opt_str(c.get("rationale"), f"candidates[{k}].rationale"),
        })
    ranking = obj.get("ranking")
    if ranking is not None and (not isinstance(ranking, list) or not all(
            isinstance(t, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in t) for t in ranking)):
        raise SchemaError("bad_ranking", "field 'ranking' must be a list of tiers (lists of candidate indices)")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise SchemaError("wrong_type", "field 'meta' must be an object")
    if key != raw_key:
        meta = {**meta, "original_key": raw_key}
    rec = {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "instruction": obj["instruction"],
        "source_images": sources,
        "candidates": out_cands,
        "ranking": ranking,
        "rationale": _opt_str(obj.get("rationale"), "rationale"),
        "source": "jsonl",
        "meta": meta,
    }
    validate_group(rec, set(sample) - {"__key__"})
    sample["json"] = dump_record(rec)
    return Result(key=key, sample=sample)
