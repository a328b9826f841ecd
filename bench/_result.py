"""The one-line machine-readable result every bench prints for bench/run_all.py (``make bench``)."""
from __future__ import annotations

import json


def emit(name: str, ours: float, baseline: float, unit: str, higher_is_better: bool, note: str = "") -> None:
    """Print ``RESULT {json}``: ours vs baseline measured in the same run, ratio = ours / baseline."""
    rec = {"name": name, "ours": float(ours), "baseline": float(baseline),
           "ratio": float(ours) / float(baseline) if baseline else float("nan"), "unit": unit,
           "higher_is_better": bool(higher_is_better)}
    if note:
        rec["note"] = note
    print("RESULT " + json.dumps(rec), flush=True)
