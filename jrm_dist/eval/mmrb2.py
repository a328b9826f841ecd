"""MMRB2 (Multimodal RewardBench 2): parquet per config (t2i, edit, interleaved, reasoning), split test.

Protocol (official scorer): every pair is judged twice, in the forward (A, B) and the reverse (B, A)
presentation order; the reverse judgement is flipped back before it is compared with ``chosen``. Task
accuracy = correct judgements / judgements; overall = total correct / total over the tasks. A scalar
reward model judges the first-presented response when its score is strictly higher; a tie is wrong.
(For a scalar model both orders agree by construction; the arithmetic is written for any judge.)
Each response is scored as one candidate: prompt images first, then the response's images, then the
prompt text (its ``<image_N>`` placeholders kept verbatim, numbering the images in that order) and the
response text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from jrm_dist.eval.common import (BenchmarkFormatError, EvalResult, ParquetRows, Score, ScoreItem, calibration_row,
                                  content_key, decode, find_parquet, image_bytes, pct, records_calibration)

SUBSETS = ("t2i", "edit", "interleaved", "reasoning")
REQUIRED = ("pair_id", "prompt_text", "response_a_text", "response_b_text", "chosen")
IMAGE_COLUMNS = ("prompt_images", "response_a_images", "response_b_images")


# ----------------------------------------------------------------------------- protocol arithmetic
def scalar_judge(first: float, second: float) -> str | None:
    """'first' / 'second' for the strictly higher score, None (a wrong judgement) on a tie."""
    if first > second:
        return "first"
    if second > first:
        return "second"
    return None


def judgements(s_a: float, s_b: float, judge: Callable[[float, float], str | None] = scalar_judge) -> dict:
    """Both presentation orders, mapped back to 'A'/'B' (None = no preference)."""
    fwd = judge(s_a, s_b)
    rev = judge(s_b, s_a)  # B shown first: 'first' means B
    return {"forward": {"first": "A", "second": "B"}.get(fwd) if fwd else None,
            "reverse": {"first": "B", "second": "A"}.get(rev) if rev else None}


def mmrb2_metrics(records: Sequence[dict]) -> dict:
    """Pure arithmetic over ``{"subset", "chosen", "forward", "reverse"}`` records (judgements 'A'/'B'/None)."""
    per: dict[str, list[int]] = {}
    for r in records:
        c = per.setdefault(r["subset"], [0, 0, 0, 0])  # right fwd, right rev, judgements, pairs
        c[0] += int(r["forward"] == r["chosen"])
        c[1] += int(r["reverse"] == r["chosen"])
        c[2] += 2
        c[3] += 1
    subsets = {s: {"accuracy": (c[0] + c[1]) / c[2], "forward_accuracy": c[0] / c[3],
                   "reverse_accuracy": c[1] / c[3], "pairs": c[3], "judgements": c[2], "correct": c[0] + c[1]}
               for s, c in sorted(per.items(), key=lambda kv: SUBSETS.index(kv[0]) if kv[0] in SUBSETS else 99)}
    right = sum(v["correct"] for v in subsets.values())
    total = sum(v["judgements"] for v in subsets.values())
    return {"subsets": subsets, "overall": {"accuracy": right / total if total else float("nan"),
                                            "judgements": total, "correct": right}}


def markdown_table(metrics: dict) -> str:
    subs = list(metrics["subsets"])
    lines = ["| " + " | ".join(subs + ["Overall"]) + " |", "|" + "---:|" * (len(subs) + 1),
             "| " + " | ".join([pct(metrics["subsets"][s]["accuracy"]) for s in subs]
                               + [pct(metrics["overall"]["accuracy"])]) + " |"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reader
def config_files(root: Path, subset: str) -> list[Path]:
    """Parquet files of one config: ``root/<config>/**.parquet`` or files named ``<config>-*.parquet`` /
    ``<config>.parquet`` anywhere under root (the hub's ``data/`` layout)."""
    if (root / subset).is_dir():
        return find_parquet(root / subset, f"config {subset}")
    files = sorted(p for p in root.rglob("*.parquet")
                   if p.stem == subset or p.stem.startswith(subset + "-") or p.stem.startswith(subset + "_"))
    return files


def normalise_chosen(v, where: str) -> str:
    c = str(v).strip().upper() if v is not None else ""
    if c not in ("A", "B"):
        raise BenchmarkFormatError(f"{where} field 'chosen': {v!r} is not 'A' or 'B'")
    return c


class MMRB2Bench:
    name = "mmrb2"

    def __init__(self, root: str | Path, subsets: Sequence[str] = SUBSETS, limit: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise BenchmarkFormatError(f"{self.root}: not a folder")
        self.parts: dict[str, ParquetRows] = {}
        self.rows: list[dict] = []
        for sub in subsets:
            files = config_files(self.root, sub)
            if not files:
                continue
            pr = ParquetRows(files, IMAGE_COLUMNS, REQUIRED)
            self.parts[sub] = pr
            for i, rec in enumerate(pr.rows[:limit] if limit else pr.rows):
                where = f"{pr.file_of(i)} row {i}"
                for f in ("pair_id", "prompt_text"):
                    if not isinstance(rec[f], str):
                        raise BenchmarkFormatError(f"{where} field '{f}': expected a string, got {rec[f]!r}")
                self.rows.append({"subset": sub, "index": i, "pair_id": rec["pair_id"],
                                  "chosen": normalise_chosen(rec["chosen"], where), "prompt_text": rec["prompt_text"],
                                  "text": {"a": rec["response_a_text"], "b": rec["response_b_text"]}})
        if not self.rows:
            raise BenchmarkFormatError(f"{self.root}: no parquet files for any of the configs {list(subsets)}")

    def _images(self, row: dict, column: str, decode_them: bool):
        pr = self.parts[row["subset"]]
        i = row["index"]
        where = f"{pr.file_of(i)} row {i} field '{column}'"
        cells = pr.image_cell(i, column) or []
        if not isinstance(cells, list):
            raise BenchmarkFormatError(f"{where}: expected a list of images, got {type(cells).__name__}")
        base = pr.file_of(i).parent
        if decode_them:
            return [decode(c, base, f"{where}[{j}]") for j, c in enumerate(cells)]
        return [image_bytes(c, base, f"{where}[{j}]") for j, c in enumerate(cells)]

    def items(self) -> list[ScoreItem]:
        items = []
        for row in self.rows:
            prompt_bytes = self._images(row, "prompt_images", False)
            for side in ("a", "b"):
                col = f"response_{side}_images"
                resp = self._images(row, col, False)
                text = row["text"][side]
                if not resp and not text:
                    pr = self.parts[row["subset"]]
                    raise BenchmarkFormatError(f"{pr.file_of(row['index'])} row {row['index']}: response {side} "
                                               "has neither text nor images")
                key = content_key(row["prompt_text"], *prompt_bytes, b"|", *resp, b"|", text)
                row[f"key_{side}"] = key
                items.append(ScoreItem(key, self._loader(row, side)))
        return items

    def _loader(self, row: dict, side: str):
        def load():
            return (row["prompt_text"], self._images(row, "prompt_images", True),
                    self._images(row, f"response_{side}_images", True), row["text"][side] or None)

        return load

    def evaluate(self, scores: dict[str, Score], rank: dict | None = None) -> EvalResult:
        records = []
        for r in self.rows:
            sa, sb = scores[r["key_a"]], scores[r["key_b"]]
            records.append({"subset": r["subset"], "pair_id": r["pair_id"], "row": r["index"], "chosen": r["chosen"],
                            "score": [sa.mu, sb.mu], "sigma": [sa.sigma, sb.sigma], "keys": [r["key_a"], r["key_b"]]})
        res = rescore_records(records, rank)
        res.scores = {k: s.as_dict() for k, s in scores.items()}
        return res


def rescore_records(records: list[dict], rank: dict | None = None) -> EvalResult:
    for r in records:
        r.update(judgements(float(r["score"][0]), float(r["score"][1])))
    m = mmrb2_metrics(records)
    # calibration of P(A beats B) once per pair (the presentation order does not change it), chosen = winner
    m["calibration"], pairs = records_calibration(records, lambda r: int(r["chosen"] == "A"), rank)
    table = markdown_table(m) + "\n\n" + calibration_row(m["calibration"])
    return EvalResult(MMRB2Bench.name, m, records, table=table, calibration_pairs=pairs)
