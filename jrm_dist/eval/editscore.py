"""EditReward-Bench, EditScore release: a ``datasets.save_to_disk`` folder of Arrow IPC stream files.

Protocol (official scorer): each output image is scored once, by its key, after resizing it to the
input image's size; a row is correct only when score[0] > score[1] strictly (index 0 is the
human-preferred output; ties are wrong); accuracy per (task_type, dimension); a group's figure is the
unweighted mean of its task types; the Average per dimension is the mean over the 13 task types.
Read with pyarrow's IPC stream reader (memory-mapped), so the ``datasets`` package is not needed.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from jrm_dist.eval.common import (BenchmarkFormatError, EvalResult, Score, ScoreItem, calibration_row, decode,
                                  pct, records_calibration)

TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "object": ("subject-add", "subject-remove", "subject-replace"),
    "appearance": ("color_alter", "material_alter", "style_change", "tone_transfer"),
    "scene": ("background_change", "extract"),
    "advanced": ("ps_human", "text_change", "motion_change", "compose"),
}
TASK_TYPES: tuple[str, ...] = tuple(t for ts in TASK_GROUPS.values() for t in ts)
DIMENSIONS: tuple[str, ...] = ("prompt_following", "consistency", "overall")
COLUMN_TITLES = {"prompt_following": "PF", "consistency": "Cons.", "overall": "Overall"}
log = logging.getLogger(__name__)
REQUIRED = ("key", "instruction", "input_image", "output_images", "task_type", "dimension")


# ----------------------------------------------------------------------------- protocol arithmetic
def editscore_metrics(rows: Sequence[tuple[str, str]], score0: Sequence[float], score1: Sequence[float]) -> dict:
    """Pure protocol arithmetic. ``rows[i] = (task_type, dimension)``; ``score0/1[i]`` the scores of the
    preferred / other output. Cells absent from the data are reported as None and left out of means."""
    if not (len(rows) == len(score0) == len(score1)):
        raise ValueError(f"lengths differ: rows={len(rows)} score0={len(score0)} score1={len(score1)}")
    correct: dict[tuple[str, str], int] = {}
    total: dict[tuple[str, str], int] = {}
    for (task, dim), a, b in zip(rows, score0, score1):
        if task not in TASK_TYPES or dim not in DIMENSIONS:
            raise ValueError(f"unknown task_type/dimension ({task!r}, {dim!r})")
        total[task, dim] = total.get((task, dim), 0) + 1
        correct[task, dim] = correct.get((task, dim), 0) + int(float(a) > float(b))

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    cells = {d: {t: (correct[t, d] / total[t, d] if (t, d) in total else None) for t in TASK_TYPES}
             for d in DIMENSIONS}
    counts = {d: {t: [correct.get((t, d), 0), total.get((t, d), 0)] for t in TASK_TYPES} for d in DIMENSIONS}
    groups = {d: {g: mean(cells[d][t] for t in ts) for g, ts in TASK_GROUPS.items()} for d in DIMENSIONS}
    average = {d: mean(cells[d].values()) for d in DIMENSIONS}
    missing = [f"{t}/{d}" for d in DIMENSIONS for t in TASK_TYPES if (t, d) not in total]
    return {"accuracy": cells, "counts": counts, "groups": groups, "average": average,
            "rows": len(rows), "missing_cells": missing}


def markdown_table(metrics: dict) -> str:
    """Paper layout: one column per dimension (PF / Cons. / Overall), task types, groups, Average."""
    dims = DIMENSIONS
    lines = ["| Task | " + " | ".join(COLUMN_TITLES[d] for d in dims) + " |",
             "|---|" + "---:|" * len(dims)]
    for g, ts in TASK_GROUPS.items():
        for t in ts:
            lines.append(f"| {t} | " + " | ".join(pct(metrics["accuracy"][d][t]) for d in dims) + " |")
    for g in TASK_GROUPS:
        lines.append(f"| **{g.capitalize()}** | " + " | ".join(pct(metrics["groups"][d][g]) for d in dims) + " |")
    lines.append("| **Average** | " + " | ".join(pct(metrics["average"][d]) for d in dims) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reader
def arrow_files(root: Path, split: str | None = None) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` folder (a Dataset, or a DatasetDict with split folders)."""
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkFormatError(f"{root}: not a folder (expected a datasets.save_to_disk folder)")
    dd = root / "dataset_dict.json"
    if dd.exists():
        splits = json.loads(dd.read_text()).get("splits") or []
        name = split or ("train" if "train" in splits else (splits[0] if splits else None))
        if name not in splits:
            raise BenchmarkFormatError(f"{dd}: split {name!r} not in {splits}")
        return arrow_files(root / name)
    state = root / "state.json"
    if state.exists():
        files = [root / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        for f in files:
            if not f.exists():
                raise BenchmarkFormatError(f"{state}: lists {f.name}, which is missing")
    else:
        files = sorted(root.glob("data-*.arrow"))
    if not files:
        raise BenchmarkFormatError(f"{root}: no Arrow files (state.json or data-*.arrow)")
    return files


def read_arrow_stream(path: Path):
    """One ``save_to_disk`` Arrow file (IPC *stream* format), memory-mapped, zero-copy."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    except pa.ArrowInvalid as e:
        raise BenchmarkFormatError(f"{path}: not an Arrow IPC stream file ({e})") from e


@dataclass
class EditScoreRow:
    file: Path
    row: int  # row index inside its file
    keys: tuple[str, str]
    instruction: str
    task_type: str
    dimension: str
    table: int  # index into EditScoreBench.tables


class EditScoreBench:
    """The rows of the release plus lazy access to their images."""

    name = "editreward-bench-editscore"

    def __init__(self, root: str | Path, split: str | None = None, limit: int | None = None):
        self.root = Path(root)
        self.tables = []
        self.rows: list[EditScoreRow] = []
        for fi, f in enumerate(arrow_files(self.root, split)):
            tbl = read_arrow_stream(f)
            missing = [c for c in REQUIRED if c not in tbl.column_names]
            if missing:
                raise BenchmarkFormatError(f"{f}: missing column(s) {missing}; has {tbl.column_names}")
            self.tables.append((f, tbl))
            small = tbl.select(["key", "instruction", "task_type", "dimension"]).to_pylist()
            for r, rec in enumerate(small):
                self.rows.append(self._check(f, r, rec, fi))
                if limit is not None and len(self.rows) >= limit:
                    break
            if limit is not None and len(self.rows) >= limit:
                break

    def _check(self, f: Path, r: int, rec: dict[str, Any], fi: int) -> EditScoreRow:
        where = f"{f} row {r}"
        key = rec["key"]
        if not (isinstance(key, list) and len(key) == 2 and all(isinstance(k, str) and k for k in key)):
            raise BenchmarkFormatError(f"{where} field 'key': expected a list of 2 non-empty strings, got {key!r}")
        if not isinstance(rec["instruction"], str):
            raise BenchmarkFormatError(f"{where} field 'instruction': expected a string")
        if rec["task_type"] not in TASK_TYPES:
            raise BenchmarkFormatError(f"{where} field 'task_type': {rec['task_type']!r} is not one of {TASK_TYPES}")
        if rec["dimension"] not in DIMENSIONS:
            raise BenchmarkFormatError(f"{where} field 'dimension': {rec['dimension']!r} is not one of {DIMENSIONS}")
        return EditScoreRow(f, r, (key[0], key[1]), rec["instruction"], rec["task_type"], rec["dimension"], fi)

    def _images(self, row: EditScoreRow):
        _, tbl = self.tables[row.table]
        inp = tbl.column("input_image")[row.row].as_py()
        outs = tbl.column("output_images")[row.row].as_py()
        where = f"{row.file} row {row.row}"
        if not isinstance(outs, list) or len(outs) != 2:
            raise BenchmarkFormatError(f"{where} field 'output_images': expected 2 images, got "
                                       f"{None if outs is None else len(outs)}")
        return inp, outs, where

    def items(self) -> list[ScoreItem]:
        """Two items per row (one per output image), keyed by the output's key: each scored once."""
        seen: dict[str, EditScoreRow] = {}
        items = []
        for row in self.rows:
            for j in (0, 1):
                first = seen.get(row.keys[j])
                if first is None:
                    seen[row.keys[j]] = row
                    items.append(ScoreItem(row.keys[j], self._loader(row, j)))
                elif first.instruction != row.instruction:
                    log.warning("key %r: %s row %d has another instruction than %s row %d; scored once with the "
                                "first", row.keys[j], row.file.name, row.row, first.file.name, first.row)
        return items

    def _loader(self, row: EditScoreRow, j: int):
        base = row.file.parent

        def load():
            from PIL import Image

            inp, outs, where = self._images(row)
            src = decode(inp, base, f"{where} field 'input_image'")
            out = decode(outs[j], base, f"{where} field 'output_images[{j}]'")
            if out.size != src.size:  # official protocol: resize the output to the input's size first
                out = out.resize(src.size, Image.Resampling.BICUBIC)
            return row.instruction, [src], [out], None

        return load

    def evaluate(self, scores: dict[str, Score], rank: dict | None = None) -> EvalResult:
        records = [{"file": r.file.name, "row": r.row, "key": list(r.keys), "task_type": r.task_type,
                    "dimension": r.dimension, "score": [scores[r.keys[0]].mu, scores[r.keys[1]].mu],
                    "sigma": [scores[r.keys[0]].sigma, scores[r.keys[1]].sigma],
                    "correct": scores[r.keys[0]].mu > scores[r.keys[1]].mu} for r in self.rows]
        res = rescore_records(records, rank)
        res.scores = {k: s.as_dict() for k, s in scores.items()}
        return res


def calibration(records: list[dict], rank: dict | None = None) -> tuple[dict, tuple | None]:
    """P(A beats B) calibration: output 0 is the human-preferred one in every row (no human ties in this
    release); over all rows, and per dimension under ``by_dimension``."""
    cal, pairs = records_calibration(records, lambda r: 1, rank)
    if pairs is not None:
        cal["by_dimension"] = {}
        for d in DIMENSIONS:
            rs = [r for r in records if r["dimension"] == d]
            if rs:
                sub = records_calibration(rs, lambda r: 1, rank)[0]
                sub.pop("bins")
                cal["by_dimension"][d] = sub
    return cal, pairs


def rescore_records(records: list[dict], rank: dict | None = None) -> EvalResult:
    """Metrics from per-record scores (used after scoring, and by ``jrm-eval rescore``)."""
    m = editscore_metrics([(r["task_type"], r["dimension"]) for r in records],
                          [r["score"][0] for r in records], [r["score"][1] for r in records])
    m["calibration"], pairs = calibration(records, rank)
    table = markdown_table(m) + "\n\n" + calibration_row(m["calibration"])
    return EvalResult(EditScoreBench.name, m, records, table=table, calibration_pairs=pairs)
