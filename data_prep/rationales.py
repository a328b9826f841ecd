"""``jrm-prep rationales``: join teacher rationales (by group key) into existing shards, so LM
supervision can be added after the preference data was prepared. Image bytes are copied untouched.

Rationale file: one JSON object per line::

    {"key": "g1", "rationale": "group-level critique",            # optional
     "candidates": {"0": "critique of candidate 0", "b": "..."}}  # by index or candidate id; or a list

A line whose key is in no shard, that repeats a key, or whose candidates do not fit the group is a
reject (file = the rationale file); the shard sample is still written.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

from jrm_dist.data.schema import SchemaError, sanitize_key, validate_group

from .jsonl_text import parse_line, read_lines
from .shards import iter_tar_samples
from .writer import Item, Result, dump_record


def load_rationales(path: str) -> tuple[dict[str, tuple[int, dict]], list[tuple[int, str | None, str, str]]]:
    """Returns ({key: (line, obj)}, bad lines as (line, key, reason, detail))."""
    good: dict[str, tuple[int, dict]] = {}
    bad: list[tuple[int, str | None, str, str]] = []
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            obj = parse_line(line)
        except SchemaError as exc:
            bad.append((lineno, None, exc.reason, exc.detail))
            continue
        if not isinstance(obj, dict) or obj.get("key") is None:
            bad.append((lineno, None, "missing_field", "field 'key' is missing"))
            continue
        key = sanitize_key(str(obj["key"]))  # shard keys are sanitised the same way
        r = obj.get("rationale")
        c = obj.get("candidates")
        if r is not None and not isinstance(r, str):
            bad.append((lineno, key, "wrong_type", "field 'rationale' must be a string"))
        elif c is not None and not (
                (isinstance(c, list) and all(v is None or isinstance(v, str) for v in c))
                or (isinstance(c, dict) and all(isinstance(v, str) for v in c.values()))):
            bad.append((lineno, key, "wrong_type", "field 'candidates' must be a list or object of strings"))
        elif r is None and c is None:
            bad.append((lineno, key, "missing_field", "neither 'rationale' nor 'candidates' is given"))
        elif key in good:
            bad.append((lineno, key, "duplicate_key", f"key already given on line {good[key][0]}"))
        else:
            good[key] = (lineno, obj)
    return good, bad


def iter_items(folder: str, shards: list[dict], rationales: dict[str, tuple[int, dict]],
               skip: int = 0) -> Iterator[Item]:
    """Every sample of the input shards, in manifest order, with its rationale entry (or None)."""
    index = 0
    for entry in shards:
        path = os.path.join(folder, entry["name"])
        n = int(entry["count"])
        if index + n <= skip:
            index += n
            continue
        i = 0
        try:
            for sample in iter_tar_samples(path):
                if index >= skip:
                    yield Item(index=index, file=path, locator={"sample": i}, key=sample["__key__"],
                               payload=(sample, rationales.get(sample["__key__"])))
                index += 1
                i += 1
        except Exception as exc:  # noqa: BLE001 - a broken input shard rejects its unread samples
            err = f"{type(exc).__name__}: {exc}"
        else:
            err = None
        # samples the manifest promises but the shard did not deliver are rejects, not silence
        while i < n:
            if index >= skip:
                yield Item(index=index, file=path, locator={"sample": i}, key=None,
                           payload=(None, err or "shard has fewer samples than its manifest entry"))
            index += 1
            i += 1


def convert(item: Item, rationale_file: str) -> Result:
    sample, entry = item.payload
    if sample is None:
        raise SchemaError("corrupt_shard", str(entry))
    try:
        rec = json.loads(sample["json"])
    except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SchemaError("bad_json", f"sample json record does not parse: {exc}") from None
    validate_group(rec, set(sample) - {"__key__", "json"})
    extra: list[dict[str, Any]] = []
    if entry is not None:
        lineno, obj = entry
        cands = rec["candidates"]
        updates: dict[int, str | None] = {}
        c = obj.get("candidates")
        problem = None
        if isinstance(c, list):
            if len(c) != len(cands):
                problem = f"{len(c)} candidate rationales for a group with K={len(cands)}"
            updates = dict(enumerate(c))
        elif isinstance(c, dict):
            ids = {str(cd.get("id")): k for k, cd in enumerate(cands)}
            for name, text in c.items():
                k = ids.get(name, int(name) if name.isdigit() and int(name) < len(cands) else None)
                if k is None:
                    problem = f"candidate {name!r} is neither an index < {len(cands)} nor an id in {sorted(ids)}"
                    break
                updates[k] = text
        if problem:
            extra.append({"file": rationale_file, "line": lineno, "key": rec["key"], "reason": "bad_rationale",
                          "detail": problem})
        else:
            for k, text in updates.items():
                if text is not None:
                    cands[k]["rationale"] = text
            if obj.get("rationale") is not None:
                rec["rationale"] = obj["rationale"]
    out = dict(sample)
    out["json"] = dump_record(rec)
    return Result(key=rec["key"], sample=out, extra=extra)
