"""EditReward-Bench, TIGER release: parquet under ``2pair/``, ``3pair/``, ``4pair/`` (split train).

Each row is one comparison: ``candidate_1`` (the first letter of ``comparison_type``, e.g. ``AvsC``) vs
``candidate_2``; ``ranking`` says which won (``A>B``, ``B>A``, ``A=B``; in 3/4pair e.g. ``C>A``). The
group is the part of ``id`` before the first ``_``. Protocol for a scalar reward model, with human
h in {1, -1, 0} and margin m = s(candidate_1) - s(candidate_2):

* 2pair: accuracy *with ties* — the model ties when |m| <= eps; (agree + both-tie) / all, maximised over
  eps in {0} ∪ {distinct |m|}.
* 3/4pair: accuracy *without ties* — human ties dropped; m == 0 is a wrong answer.
* group accuracy: a group is correct only when every one of its comparisons is (a human tie counts as
  right when the model ties at the subset's eps: eps* for 2pair, 0 for 3/4pair); Overall = correct
  groups / all groups over the subsets.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from jrm_dist.eval.common import (BenchmarkFormatError, EvalResult, ParquetRows, Score, ScoreItem, calibration_row,
                                  content_key, decode, find_parquet, image_bytes, pct, records_calibration)

SUBSETS = ("2pair", "3pair", "4pair")
REQUIRED = ("id", "instruction", "ranking", "comparison_type")
IMAGE_COLUMNS = ("source_image", "candidate_1", "candidate_2")
_RANKING = re.compile(r"^\s*([A-Z])\s*([<>=])\s*([A-Z])(?:\s*=.*)?\s*$")  # 'A>B', 'C<A', 'A=B', 'A=B=Good'
_COMPARISON = re.compile(r"^\s*([A-Z])\s*vs\s*([A-Z])\s*$", re.IGNORECASE)


# ----------------------------------------------------------------------------- protocol arithmetic
def human_label(ranking: str, comparison_type: str | None, where: str = "") -> int:
    """+1 when candidate_1 won, -1 when candidate_2 won, 0 for a tie."""
    first, second = "A", "B"
    if comparison_type:
        mc = _COMPARISON.match(str(comparison_type))
        if not mc:
            raise BenchmarkFormatError(f"{where} field 'comparison_type': {comparison_type!r} is not like 'AvsB'")
        first, second = mc.group(1).upper(), mc.group(2).upper()
    mr = _RANKING.match(str(ranking))
    if not mr:
        raise BenchmarkFormatError(f"{where} field 'ranking': {ranking!r} is not like 'A>B', 'B>A' or 'A=B'")
    x, op, y = mr.groups()
    if {x, y} != {first, second}:
        raise BenchmarkFormatError(f"{where} field 'ranking': {ranking!r} does not compare the letters of "
                                   f"comparison_type {first}vs{second}")
    if op == "=":
        return 0
    winner = x if op == ">" else y
    return 1 if winner == first else -1


def accuracy_with_ties(h: Sequence[int], m: Sequence[float]) -> tuple[float, float]:
    """(max accuracy, its eps) over eps in {0} ∪ {distinct |m|}; the smallest eps wins a draw."""
    h = np.asarray(h, dtype=np.int64)
    m = np.asarray(m, dtype=np.float64)
    if h.size == 0:
        return float("nan"), 0.0
    a = np.abs(m)
    eps = np.unique(np.concatenate([[0.0], a]))  # sorted ascending
    tie_abs = np.sort(a[h == 0])  # human ties: right when |m| <= eps
    agree_abs = np.sort(a[(h != 0) & (np.sign(m) == h)])  # right when |m| > eps
    right = np.searchsorted(tie_abs, eps, side="right") + (agree_abs.size - np.searchsorted(agree_abs, eps, side="right"))
    best = int(np.argmax(right))
    return float(right[best] / h.size), float(eps[best])


def accuracy_without_ties(h: Sequence[int], m: Sequence[float]) -> float:
    """Human ties dropped; the model must have the sign of h (m == 0 is wrong)."""
    h = np.asarray(h, dtype=np.int64)
    m = np.asarray(m, dtype=np.float64)
    keep = h != 0
    if not keep.any():
        return float("nan")
    return float(np.mean(np.sign(m[keep]) == h[keep]))


def pair_correct(h: int, m: float, eps: float) -> bool:
    if h == 0:
        return abs(m) <= eps
    return abs(m) > eps and (m > 0) == (h > 0)


def tiger_metrics(records: Sequence[dict]) -> dict:
    """Pure arithmetic over records ``{"subset", "group", "h", "m"}`` (one per comparison)."""
    out: dict = {"subsets": {}}
    all_h, all_m = [], []
    groups_total = groups_right = 0
    for sub in sorted({r["subset"] for r in records}, key=lambda s: (SUBSETS.index(s) if s in SUBSETS else 99, s)):
        rs = [r for r in records if r["subset"] == sub]
        h = [int(r["h"]) for r in rs]
        m = [float(r["m"]) for r in rs]
        if sub == "2pair":
            acc, eps = accuracy_with_ties(h, m)
            kind = "with_ties"
        else:
            acc, eps = accuracy_without_ties(h, m), 0.0
            kind = "without_ties"
        group_ok: dict[str, bool] = {}
        for r, hi, mi in zip(rs, h, m):
            group_ok[r["group"]] = group_ok.get(r["group"], True) and pair_correct(hi, mi, eps)
        n_right = sum(group_ok.values())
        out["subsets"][sub] = {"pairwise_accuracy": acc, "pairwise_kind": kind, "eps": eps, "pairs": len(rs),
                               "group_accuracy": n_right / len(group_ok), "groups": len(group_ok),
                               "groups_correct": n_right}
        groups_total += len(group_ok)
        groups_right += n_right
        all_h += h
        all_m += m
    out["overall"] = {"group_accuracy": groups_right / groups_total if groups_total else float("nan"),
                      "groups": groups_total, "groups_correct": groups_right,
                      "pairwise_accuracy_with_ties": accuracy_with_ties(all_h, all_m)[0], "pairs": len(all_h)}
    return out


def markdown_table(metrics: dict) -> str:
    lines = ["| Subset | Pairs | Pairwise acc. | Groups | Group acc. |", "|---|---:|---:|---:|---:|"]
    for sub, s in metrics["subsets"].items():
        kind = "ties-aware, eps=%.4g" % s["eps"] if s["pairwise_kind"] == "with_ties" else "ties dropped"
        lines.append(f"| {sub} | {s['pairs']} | {pct(s['pairwise_accuracy'])} ({kind}) | {s['groups']} | "
                     f"{pct(s['group_accuracy'])} |")
    o = metrics["overall"]
    lines.append(f"| **Overall** | {o['pairs']} | {pct(o['pairwise_accuracy_with_ties'])} (ties-aware) | "
                 f"{o['groups']} | {pct(o['group_accuracy'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reader
class TigerBench:
    name = "editreward-bench-tiger"

    def __init__(self, root: str | Path, subsets: Sequence[str] = SUBSETS, limit: int | None = None):
        self.root = Path(root)
        present = [s for s in subsets if (self.root / s).is_dir()]
        if not present:
            raise BenchmarkFormatError(f"{self.root}: none of the folders {list(subsets)} exists "
                                       "(expected the TIGER release layout 2pair/ 3pair/ 4pair/)")
        self.parts: dict[str, ParquetRows] = {}
        self.rows: list[dict] = []  # one per comparison
        for sub in present:
            pr = ParquetRows(find_parquet(self.root / sub, f"subset {sub}"), IMAGE_COLUMNS, REQUIRED)
            self.parts[sub] = pr
            for i, rec in enumerate(pr.rows):
                where = f"{pr.file_of(i)} row {i}"
                if not isinstance(rec["id"], str) or not rec["id"]:
                    raise BenchmarkFormatError(f"{where} field 'id': expected a non-empty string, got {rec['id']!r}")
                h = human_label(rec["ranking"], rec.get("comparison_type"), where)
                self.rows.append({"subset": sub, "index": i, "id": rec["id"], "group": rec["id"].split("_")[0],
                                  "comparison_type": rec.get("comparison_type"), "ranking": rec["ranking"], "h": h,
                                  "instruction": rec["instruction"], "dataset": rec.get("dataset")})
            if limit is not None:
                self.rows = self.rows[:limit]

    def _key(self, row: dict, col: str) -> str:
        pr = self.parts[row["subset"]]
        where = f"{pr.file_of(row['index'])} row {row['index']}"
        base = pr.file_of(row["index"]).parent
        src = image_bytes(pr.image_cell(row["index"], "source_image"), base, f"{where} field 'source_image'")
        cand = image_bytes(pr.image_cell(row["index"], col), base, f"{where} field '{col}'")
        return content_key(row["instruction"], src, cand)

    def items(self) -> list[ScoreItem]:
        """One item per distinct (instruction, source, candidate): a candidate shared by several comparisons
        of a 3/4pair group is scored once."""
        items = []
        for row in self.rows:
            for col in ("candidate_1", "candidate_2"):
                key = self._key(row, col)
                row[f"{col}_key"] = key
                items.append(ScoreItem(key, self._loader(row, col)))
        return items

    def _loader(self, row: dict, col: str):
        pr = self.parts[row["subset"]]
        i = row["index"]
        where = f"{pr.file_of(i)} row {i}"
        base = pr.file_of(i).parent

        def load():
            src = decode(pr.image_cell(i, "source_image"), base, f"{where} field 'source_image'")
            cand = decode(pr.image_cell(i, col), base, f"{where} field '{col}'")
            return row["instruction"], [src], [cand], None

        return load

    def evaluate(self, scores: dict[str, Score], rank: dict | None = None) -> EvalResult:
        records = []
        for r in self.rows:
            s1, s2 = scores[r["candidate_1_key"]], scores[r["candidate_2_key"]]
            records.append({"subset": r["subset"], "id": r["id"], "group": r["group"], "row": r["index"],
                            "comparison_type": r["comparison_type"], "ranking": r["ranking"], "h": r["h"],
                            "score": [s1.mu, s2.mu], "sigma": [s1.sigma, s2.sigma], "m": s1.mu - s2.mu,
                            "keys": [r["candidate_1_key"], r["candidate_2_key"]]})
        res = rescore_records(records, rank)
        res.scores = {k: s.as_dict() for k, s in scores.items()}
        return res


def rescore_records(records: list[dict], rank: dict | None = None) -> EvalResult:
    for r in records:  # m from the stored scores, so an edited score is honoured
        r["m"] = float(r["score"][0]) - float(r["score"][1])
    m = tiger_metrics(records)
    # calibration of P(candidate_1 beats candidate_2) over every comparison a human decided (ties left out)
    m["calibration"], pairs = records_calibration(records, lambda r: {1: 1, -1: 0}.get(int(r["h"])), rank)
    table = markdown_table(m) + "\n\n" + calibration_row(m["calibration"])
    return EvalResult(TigerBench.name, m, records, table=table, calibration_pairs=pairs)
