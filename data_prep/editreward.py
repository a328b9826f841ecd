"""EditReward-Data (parquet pairs, see docs/BENCHMARKS.md) -> group records with K = 2.

Read row group by row group so a 87 GB release never has to fit in memory, and so a resumed run
skips finished row groups without reading their image bytes.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Any, Iterator

import pyarrow.parquet as pq

from jrm_dist.data.schema import SCHEMA_VERSION, SchemaError, sanitize_key, validate_group

from .images import check_image, read_image_file
from .writer import Item, Result, dump_record

# vote_type -> ranking tiers over (left=0, right=1); anything else is a reject, never a guess.
VOTES = {
    "leftvote": [[0], [1]],
    "rightvote": [[1], [0]],
    "tie": [[0, 1]],
    "tievote": [[0, 1]],
    "bothbad_vote": [[0, 1]],
}
SCORE_RANGES = {"instruction_following": (1.0, 4.0), "quality_aesthetic": (1.0, 4.0), "overall": (2.0, 8.0)}
IMAGE_COLUMNS = (("source_img", "src0"), ("left_output_image", "c0_0"), ("right_output_image", "c1_0"))
COLUMNS = ("key", "unique_key", "instruction", "left_model", "right_model", "vote_type", "pair_index",
           "metadata_index", "left_img_rel", "right_img_rel",
           *(f"{side}_{dim}_score" for side in ("left", "right") for dim in SCORE_RANGES),
           *(c for c, _ in IMAGE_COLUMNS))


def list_parquet(inputs: list[str]) -> list[str]:
    """Files as given, directories searched recursively for *.parquet; sorted within a directory."""
    files: list[str] = []
    for p in inputs:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "**", "*.parquet"), recursive=True))
            if not found:
                raise FileNotFoundError(f"no *.parquet files under {p}")
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    return files


def count_rows(files: list[str]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def iter_items(files: list[str], skip: int = 0) -> Iterator[Item]:
    index = 0
    for path in files:
        pf = pq.ParquetFile(path)
        cols = [c for c in COLUMNS if c in pf.schema_arrow.names]
        row_no = 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if index + n <= skip:  # finished in an earlier run: skip without reading images
                index += n
                row_no += n
                continue
            for batch in pf.iter_batches(batch_size=64, row_groups=[rg], columns=cols):
                for row in batch.to_pylist():
                    if index >= skip:
                        yield Item(index=index, file=path, locator={"row": row_no},
                                   key=_raw_key(row), payload=row)
                    index += 1
                    row_no += 1


def _raw_key(row: dict[str, Any]) -> str | None:
    k = row.get("unique_key")
    if k is None:
        k = row.get("key")
    return None if k is None else str(k)


def _image_bytes(value: Any, column: str, root: str, allow_outside: bool = False) -> bytes:
    """An HF ``Image`` struct {bytes, path}: inline bytes first, else the path under ``root``."""
    if value is None:
        raise SchemaError("missing_image", f"column '{column}' is null")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return read_image_file(value, root, f"column '{column}'", allow_outside)
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        return read_image_file(value.get("path"), root, f"column '{column}'", allow_outside)
    raise SchemaError("wrong_type", f"column '{column}' is a {type(value).__name__}, not an Image struct")


def convert(item: Item, images_root: str | None = None, max_pixels: int | None = None,
            allow_outside: bool = False) -> Result:
    """One parquet row -> one shard sample (json + 3 images). Raises SchemaError with the column."""
    row = item.payload
    raw_key = _raw_key(row)
    if raw_key is None:
        raise SchemaError("missing_field", "columns 'unique_key' and 'key' are both missing or null")
    key = sanitize_key(raw_key)
    instruction = row.get("instruction")
    if instruction is None:
        raise SchemaError("missing_field", "column 'instruction' is missing or null")
    if not isinstance(instruction, str):
        raise SchemaError("wrong_type", "column 'instruction' is not a string")
    vote = row.get("vote_type")
    if vote is None:
        raise SchemaError("missing_field", "column 'vote_type' is missing or null")
    ranking = VOTES.get(str(vote).strip().lower())
    if ranking is None:
        raise SchemaError("bad_vote", f"column 'vote_type'={vote!r} is not one of {sorted(VOTES)}")
    scores: dict[str, dict[str, float]] = {"left": {}, "right": {}}
    for side in ("left", "right"):
        for dim, (lo, hi) in SCORE_RANGES.items():
            col = f"{side}_{dim}_score"
            v = row.get(col)
            if v is None:
                raise SchemaError("missing_field", f"column '{col}' is missing or null")
            v = float(v)
            if not math.isfinite(v) or not lo <= v <= hi:
                raise SchemaError("score_out_of_range", f"column '{col}'={v} is outside [{lo:g}, {hi:g}]")
            scores[side][dim] = v
    root = images_root or os.path.dirname(os.path.abspath(item.file))
    sample: dict[str, bytes] = {"__key__": key}
    names: dict[str, str] = {}
    for column, base in IMAGE_COLUMNS:
        data, ext = check_image(_image_bytes(row.get(column), column, root, allow_outside), f"column '{column}'",
                                max_pixels)
        names[base] = f"{base}.{ext}"
        sample[names[base]] = data
    meta = {c: row.get(c) for c in ("key", "unique_key", "pair_index", "metadata_index", "left_img_rel",
                                    "right_img_rel") if row.get(c) is not None}
    meta["vote_type"] = vote
    rec = {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "instruction": instruction,
        "source_images": [names["src0"]],
        "candidates": [
            {"id": side, "images": [names[base]], "text": None, "model": row.get(f"{side}_model"),
             "scores": scores[side], "rationale": None}
            for side, base in (("left", "c0_0"), ("right", "c1_0"))
        ],
        "ranking": ranking,
        "rationale": None,
        "source": "editreward",
        "meta": meta,
    }
    validate_group(rec, set(sample) - {"__key__"})
    sample["json"] = dump_record(rec)
    return Result(key=key, sample=sample)
