"""What every benchmark protocol shares: decoding released image columns, batched scoring with the
reward head only (LM path off), writing the results JSON, MLflow logging.

Scoring is kept apart from the protocol arithmetic: readers turn rows into ``ScoreItem``s (keyed, with
lazy image loading so a 3k-row benchmark never sits decoded in memory), ``Scorer`` maps keys to
(mu, sigma), and the protocol modules are pure functions over those numbers.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from PIL import Image

from jrm_dist.processing import open_image


class BenchmarkFormatError(ValueError):
    """A released file that does not have the documented layout (names the file, the row, the field)."""


def image_bytes(value: Any, base_dir: Path, where: str) -> bytes:
    """Bytes of one HF ``Image`` cell (``{"bytes": ..., "path": ...}``): inline bytes, else the file at
    ``path`` (absolute, or relative to the dataset folder)."""
    if value is None:
        raise BenchmarkFormatError(f"{where}: image is null")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, dict):
        raise BenchmarkFormatError(f"{where}: expected an Image struct {{bytes, path}}, got {type(value).__name__}")
    if value.get("bytes"):
        return bytes(value["bytes"])
    path = value.get("path")
    if not path:
        raise BenchmarkFormatError(f"{where}: Image struct has neither bytes nor path")
    p = Path(path)
    if not p.is_absolute():
        p = base_dir / p
    if not p.is_file():
        raise BenchmarkFormatError(f"{where}: image path {path!r} not found (looked at {p})")
    return p.read_bytes()


def decode(value: Any, base_dir: Path, where: str) -> Image.Image:
    try:
        return open_image(image_bytes(value, base_dir, where), where)
    except ValueError as e:
        raise BenchmarkFormatError(str(e)) from e


@dataclass
class ScoreItem:
    """One thing to score. ``load()`` returns (instruction, source images, candidate images, candidate text);
    it runs only when the item's batch is scored."""

    key: str
    load: Callable[[], tuple[str, list[Image.Image], list[Image.Image], str | None]]


@dataclass
class Score:
    mu: float
    sigma: float

    def as_dict(self) -> dict[str, float]:
        return {"mu": self.mu, "sigma": self.sigma}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Scorer:
    """A JRM checkpoint in inference mode: reward head only, batched, each key scored once."""

    def __init__(self, model_dir: str, batch_size: int = 8, device: str = "auto", dtype: str = "float32",
                 max_pixels: int | None = None, attn_implementation: str = "auto"):
        from jrm_dist.data.collate import Collator
        from jrm_dist.model import JointRewardModel
        from jrm_dist.processing import RewardProcessor

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.model_dir = str(model_dir)
        self.device = resolve_device(device)
        self.model = JointRewardModel.from_pretrained(model_dir, dtype=DTYPES[dtype],
                                                      attn_implementation=attn_implementation).to(self.device).eval()
        self.processor = RewardProcessor.from_pretrained(model_dir, max_pixels=max_pixels)
        self.collator = Collator(self.processor)
        self.batch_size = batch_size

    def encode(self, instruction: str, sources: Sequence[Image.Image], candidates: Sequence[Image.Image],
               text: str | None = None):
        return self.processor.encode(instruction, list(sources), list(candidates), text)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @torch.inference_mode()
    def score_encoded(self, encoded: list) -> list[Score]:
        """Score already-encoded candidates in one forward (the caller sizes the batch)."""
        from jrm_dist.data.collate import EncodedGroup

        batch = self.collator([EncodedGroup(str(i), [e], [], [], []) for i, e in enumerate(encoded)])
        mu, sigma = self.model.score(self._to_device(batch))
        return [Score(float(m), float(s)) for m, s in zip(mu.float().cpu(), sigma.float().cpu())]

    def score_items(self, items: Iterable[ScoreItem], desc: str = "scoring") -> dict[str, Score]:
        """key → Score. Duplicate keys are scored once (the first item with that key is used)."""
        from tqdm import tqdm

        unique: dict[str, ScoreItem] = {}
        for it in items:
            unique.setdefault(it.key, it)
        out: dict[str, Score] = {}
        todo = list(unique.values())
        with tqdm(total=len(todo), desc=desc, unit="img") as bar:
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i: i + self.batch_size]
                encoded = [self.encode(*it.load()) for it in chunk]
                for it, s in zip(chunk, self.score_encoded(encoded)):
                    out[it.key] = s
                bar.update(len(chunk))
        return out


def write_results(out: str | os.PathLike, payload: dict[str, Any], table: str) -> tuple[Path, Path]:
    """``out`` (JSON with per-record scores, metrics and table) and the table next to it as ``.md``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, table=table, created=_dt.datetime.now(_dt.timezone.utc).isoformat())
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    tmp.replace(out)
    md = out.with_suffix(".md")
    md.write_text(table + "\n")
    return out, md


def flatten_metrics(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dict of numbers → flat ``a/b/c`` names (MLflow metric names); None/NaN dropped."""
    flat: dict[str, float] = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            flat.update(flatten_metrics(v, name))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            flat[name] = float(v)
    return flat


def log_to_mlflow(run_id: str, metrics: dict[str, float], artifacts: Sequence[str | os.PathLike],
                  artifact_path: str = "eval") -> None:
    """Log metrics in one ``log_batch`` call (chunked at MLflow's 1000-metric limit) and the result files
    to an existing run. MLFLOW_TRACKING_URI is respected (MLflow reads it)."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    ts = int(time.time() * 1000)
    ms = [Metric(key=k, value=v, timestamp=ts, step=0) for k, v in metrics.items()]
    for i in range(0, len(ms), 1000):
        client.log_batch(run_id, metrics=ms[i: i + 1000])
    for a in artifacts:
        client.log_artifact(run_id, str(a), artifact_path=artifact_path)


@dataclass
class EvalResult:
    """What a benchmark run produces: metrics (nested), per-record rows, per-key scores, markdown, and
    (P(A beats B), outcome) of the decided human pairs for the reliability diagram (not serialised)."""

    benchmark: str
    metrics: dict[str, Any]
    records: list[dict[str, Any]]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    table: str = ""
    calibration_pairs: tuple[torch.Tensor, torch.Tensor] | None = None

    def payload(self, **extra: Any) -> dict[str, Any]:
        return {"benchmark": self.benchmark, **extra, "metrics": self.metrics, "records": self.records,
                "scores": self.scores}


# ----------------------------------------------------------------------------- calibration of P(A beats B)
def rank_model(model_dir: str | os.PathLike, rank_mode: str | None = None) -> dict[str, Any]:
    """How P(A beats B) is computed for a checkpoint: the loss it was trained with, as recorded in its
    jrm_config.json (``loss``), unless ``rank_mode`` overrides it; thurstone without a tie margin when the
    checkpoint records nothing. ``source`` says which of these applied."""
    from jrm_dist.losses import RANK_MODES
    from jrm_dist.metrics import rank_settings
    from jrm_dist.processing import JRM_CONFIG

    f = Path(model_dir) / JRM_CONFIG
    loss = json.loads(f.read_text()).get("loss") if f.is_file() else None
    mode, margin = rank_settings(loss)
    source = "checkpoint" if loss else "default"
    if rank_mode is not None:
        if rank_mode not in RANK_MODES:
            raise ValueError(f"rank mode {rank_mode!r}: expected one of {RANK_MODES}")
        mode, source = rank_mode, "flag"
    return {"rank_mode": mode, "tie_margin": margin, "source": source}


def records_calibration(records: Sequence[dict[str, Any]], outcome: Callable[[dict[str, Any]], int | None],
                        rank: dict[str, Any] | None = None,
                        ) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor] | None]:
    """Calibration of P(A beats B) over result records holding ``score`` = [mu_A, mu_B] and ``sigma`` =
    [sigma_A, sigma_B]; ``outcome(record)`` is 1 when a human preferred A, 0 for B, None for a human tie
    (left out: P(win) says nothing testable about a tie). Returns the metrics (+ rank mode and
    reliability bins) and the (p, outcome) tensors the reliability diagram is drawn from; records
    without ``sigma`` (older result files) give ``{"n": 0, "skipped": ...}`` and no tensors."""
    from jrm_dist.metrics import calibration_metrics, reliability_bins, win_probability

    if any("sigma" not in r for r in records):
        return {"n": 0, "skipped": "records carry no sigma"}, None
    rank = rank or {"rank_mode": "thurstone", "tie_margin": 0.0}
    rows = [(r["score"][0], r["sigma"][0], r["score"][1], r["sigma"][1], y)
            for r in records for y in [outcome(r)] if y is not None]
    cols = list(zip(*rows)) or [[], [], [], [], []]
    p = win_probability(*cols[:4], mode=rank["rank_mode"], tie_margin=rank.get("tie_margin", 0.0))
    y = torch.as_tensor(cols[4], dtype=torch.float64)
    m = {"rank_mode": rank["rank_mode"], "tie_margin": rank.get("tie_margin", 0.0), **calibration_metrics(p, y),
         "bins": reliability_bins(p, y)}
    return m, (p, y)


def calibration_row(m: dict[str, Any]) -> str:
    """One markdown line for the results table."""
    if not m.get("n"):
        return f"Calibration of P(A beats B): {m.get('skipped', 'no decided pairs')}."
    return (f"Calibration of P(A beats B) ({m['rank_mode']}, {m['n']} decided pairs): log-likelihood "
            f"{m['log_likelihood']:.4f}, Brier {m['brier']:.4f}, ECE {m['ece']:.4f}, selective accuracy "
            f"25/50/100%: {pct(m['sel_acc_25'])} / {pct(m['sel_acc_50'])} / {pct(m['sel_acc_100'])}")


class ParquetRows:
    """Rows of one or more parquet files: small columns read eagerly, image columns read on demand one row
    group at a time (a one-entry cache; items are scored in row order, so each row group is read once)."""

    def __init__(self, files: Sequence[Path], image_columns: Sequence[str], required: Sequence[str]):
        import pyarrow.parquet as pq

        self.files = [Path(f) for f in files]
        self.image_columns = list(image_columns)
        self.rows: list[dict[str, Any]] = []
        self.where: list[tuple[int, int, int]] = []  # (file, row group, row in group)
        self._cache: tuple[tuple[int, int], dict[str, list]] | None = None
        for fi, f in enumerate(self.files):
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            missing = [c for c in list(required) + self.image_columns if c not in names]
            if missing:
                raise BenchmarkFormatError(f"{f}: missing column(s) {missing}; has {sorted(names)}")
            small = [c for c in pf.schema_arrow.names if c not in self.image_columns]
            for rg in range(pf.num_row_groups):
                part = pf.read_row_group(rg, columns=small).to_pylist()
                self.rows += part
                self.where += [(fi, rg, j) for j in range(len(part))]

    def __len__(self) -> int:
        return len(self.rows)

    def file_of(self, i: int) -> Path:
        return self.files[self.where[i][0]]

    def image_cell(self, i: int, column: str) -> Any:
        import pyarrow.parquet as pq

        fi, rg, j = self.where[i]
        if self._cache is None or self._cache[0] != (fi, rg):
            tbl = pq.ParquetFile(self.files[fi]).read_row_group(rg, columns=self.image_columns)
            self._cache = ((fi, rg), {c: tbl.column(c).to_pylist() for c in self.image_columns})
        return self._cache[1][column][j]


def find_parquet(folder: Path, what: str) -> list[Path]:
    files = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    if not files:
        raise BenchmarkFormatError(f"{folder}: no .parquet files for {what}")
    return files


def content_key(*parts: bytes | str | None) -> str:
    """A key for de-duplicating identical scoring inputs (sha1 over the parts, length-prefixed)."""
    import hashlib

    h = hashlib.sha1()
    for p in parts:
        b = b"" if p is None else (p.encode() if isinstance(p, str) else p)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:20]


def pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.2f}"
