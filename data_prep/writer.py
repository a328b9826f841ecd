"""Deterministic, resumable shard writing shared by every jrm-prep sub-command.

How it stays deterministic: inputs are processed in a fixed order (parallel work is mapped back in
order), tar headers carry fixed mtime/uid/gid/uname/mode, shards are plain (uncompressed) tar, and
the webdataset ``ShardWriter`` rolls shards by count/size of that same sequence.

How it resumes: every closed shard is written to ``*.tmp``, hashed, renamed, and then one line is
appended (and fsynced) to ``.jrm-prep-progress.jsonl``: the shard (name, count, bytes, sha256), the
index of the first input record not yet covered, and how many rejects.jsonl lines belong before it.
A rerun with the same options keeps those shards, truncates rejects.jsonl to that count and
continues from that input index with the next shard number. Because a shard boundary depends only
on the records after the previous boundary, the resumed output is byte-identical to an
uninterrupted run.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import webdataset as wds

from jrm_dist.data.schema import SCHEMA_VERSION

JOURNAL = ".jrm-prep-progress.jsonl"
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
SHARD_PATTERN = "shard-%06d.tar"
_SHARD_RE = re.compile(r"^shard-\d{6}\.tar(\.tmp)?$")
FIXED_MTIME = 946684800  # 2000-01-01: any constant works, it only has to be the same every run


class PrepError(RuntimeError):
    """A problem with the job itself (not with one record): reported and exit code 2."""


@dataclass
class Item:
    """One input record: ``index`` is its position in the job's input order (the resume cursor)."""

    index: int
    file: str
    locator: dict[str, Any]  # e.g. {"row": 12} or {"line": 3}: names the record inside ``file``
    key: str | None          # best guess at the key before conversion (for reject lines)
    payload: Any


@dataclass
class Result:
    """What conversion made of one Item: a sample for the shard, or a reject reason."""

    key: str | None
    sample: dict[str, bytes] | None = None
    reason: str | None = None
    detail: str | None = None
    # further reject lines caused by this item (written after it, see run_job): file/locator/key/reason/detail
    extra: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Summary:
    written: int = 0
    rejected: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


def parse_size(text: str | int | float) -> int:
    """'1GB', '500MB', '64k', '1e9' -> bytes (decimal units, as ShardWriter counts them)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"cannot parse size {text!r} (examples: 1GB, 500MB, 1e9)")
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_keys(path: str) -> list[str]:
    """Sample keys of a shard in order (reads tar headers only)."""
    keys: list[str] = []
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            k = m.name.split(".", 1)[0]
            if not keys or keys[-1] != k:
                keys.append(k)
    return keys


def dump_record(rec: dict) -> bytes:
    """Canonical JSON bytes of a record (sorted keys: same record -> same bytes)."""
    return json.dumps(rec, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class DiskSizeShardWriter(wds.ShardWriter):
    """ShardWriter whose --shard-size counts bytes on disk: it counts payload only, so small images
    would otherwise give shards several times the asked size (512-byte header + padding per file)."""

    def write(self, obj):
        super().write(obj)
        self.size += sum(512 + (-len(v)) % 512 for k, v in obj.items() if not k.startswith("_"))


class ResumableShardWriter:
    """Writes samples to ``out_dir/shard-NNNNNN.tar`` plus manifest.json and rejects.jsonl."""

    def __init__(self, out_dir: str, *, source: str, command: list[str], options: dict[str, Any],
                 shard_size: int, max_count: int, overwrite: bool = False):
        self.out_dir = out_dir
        self.source = source
        self.command = command
        self.options = options
        self.shard_size = shard_size
        self.max_count = max_count
        os.makedirs(out_dir, exist_ok=True)
        self.job = {"sub_command": source, "options": options, "shard_size": shard_size,
                    "max_count": max_count, "schema_version": SCHEMA_VERSION}
        self.done: list[dict[str, Any]] = []   # finished shard entries, in order
        self.skip_inputs = 0                   # first input index still to process
        self.seen_keys: set[str] = set()
        self.rejected_keys: set[str] = set()
        self._writer: DiskSizeShardWriter | None = None
        self._cursor = 0
        self._n_rejects = 0
        self._prepare(overwrite)
        self._rejects = open(os.path.join(out_dir, REJECTS), "a", encoding="utf-8")

    # ---- setup / resume -------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def _ours(self) -> list[str]:
        return [n for n in os.listdir(self.out_dir)
                if _SHARD_RE.match(n) or n in (JOURNAL, MANIFEST, REJECTS, MANIFEST + ".tmp")]

    def _prepare(self, overwrite: bool) -> None:
        journal = self._path(JOURNAL)
        entries: list[dict[str, Any]] = []
        if os.path.exists(journal) and not overwrite:
            with open(journal, encoding="utf-8") as f:
                lines = [ln for ln in f.read().split("\n") if ln.strip()]
            try:
                header = json.loads(lines[0]) if lines else {}
                # a line cut by a kill mid-write is ignored: it was never acknowledged
                for ln in lines[1:]:
                    try:
                        entries.append(json.loads(ln))
                    except json.JSONDecodeError:
                        break
            except json.JSONDecodeError:
                header = {}
            if header.get("job") != self.job:
                raise PrepError(f"{self.out_dir} holds output of a different job ({header.get('job')}); "
                                f"use --overwrite or another --out")
        elif any(True for _ in self._ours()) and not overwrite:
            raise PrepError(f"{self.out_dir} already has shards/manifest but no {JOURNAL}; "
                            f"use --overwrite or another --out")
        if overwrite or not entries:
            for n in self._ours():
                os.remove(self._path(n))
            with open(journal, "w", encoding="utf-8") as f:
                f.write(json.dumps({"job": self.job}, sort_keys=True) + "\n")
            return
        # resume: keep shards the journal acknowledges (and that are still intact on disk)
        for e in entries:
            s = e.get("shard")
            if s is not None:
                p = self._path(s["name"])
                if not os.path.exists(p) or os.path.getsize(p) != s["bytes"]:
                    raise PrepError(f"cannot resume: {p} is missing or changed since it was written; "
                                    f"use --overwrite")
                self.done.append(s)
            self.skip_inputs = e["next_input"]
            self._n_rejects = e["rejects"]
        keep = {s["name"] for s in self.done}
        for n in os.listdir(self.out_dir):
            if _SHARD_RE.match(n) and n not in keep:
                os.remove(self._path(n))  # half-written or unacknowledged: will be rewritten
        rej = self._path(REJECTS)
        kept_lines: list[str] = []
        if os.path.exists(rej):
            with open(rej, encoding="utf-8") as f:
                kept_lines = f.read().split("\n")[: self._n_rejects]
        if len(kept_lines) < self._n_rejects:
            raise PrepError(f"cannot resume: {rej} has fewer lines than the journal says; use --overwrite")
        with open(rej, "w", encoding="utf-8") as f:
            f.write("".join(ln + "\n" for ln in kept_lines))
        for ln in kept_lines:
            k = json.loads(ln).get("key")
            if k is not None:
                self.rejected_keys.add(k)
        for s in self.done:
            self.seen_keys.update(shard_keys(self._path(s["name"])))
        if os.path.exists(self._path(MANIFEST)):
            os.remove(self._path(MANIFEST))

    # ---- writing ----------------------------------------------------------------------------------
    def _open(self, fname: str):
        # ShardWriter does not close a file object it was handed: keep it and close it in _post
        self._tmpf = open(fname + ".tmp", "wb")
        return self._tmpf

    def _post(self, fname: str) -> None:
        """Called by ShardWriter when a shard is closed: hash, rename, acknowledge in the journal."""
        tmp = fname + ".tmp"
        self._tmpf.flush()
        os.fsync(self._tmpf.fileno())
        self._tmpf.close()
        entry = {"name": os.path.basename(fname), "count": self._shard_count,
                 "bytes": os.path.getsize(tmp), "sha256": sha256_file(tmp)}
        os.replace(tmp, fname)
        self.done.append(entry)
        self._journal({"shard": entry, "next_input": self._cursor, "rejects": self._n_rejects})
        self._shard_count = 0

    def _journal(self, entry: dict[str, Any]) -> None:
        self._rejects.flush()
        os.fsync(self._rejects.fileno())
        with open(self._path(JOURNAL), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write(self, index: int, sample: dict[str, bytes]) -> None:
        key = sample["__key__"]
        self._cursor = index  # a shard closed by this call covers inputs < index
        if self._writer is None:
            pattern = os.path.join(self.out_dir.replace("%", "%%"), SHARD_PATTERN)
            self._writer = DiskSizeShardWriter(
                pattern, maxcount=self.max_count, maxsize=self.shard_size, post=self._post,
                start_shard=len(self.done), verbose=0, opener=self._open, encoder=False,
                mtime=FIXED_MTIME, user="jrm", group="jrm", mode=0o444)
            self._shard_count = 0
        self._writer.write(sample)
        self._shard_count += 1
        self.seen_keys.add(key)

    def reject(self, item: Item | None, key: str | None, reason: str, detail: str,
               line: dict[str, Any] | None = None) -> None:
        """Append one rejects.jsonl line: the file, where in it (row/line/sample), key and reason."""
        line = dict(line) if line is not None else {"file": item.file, **item.locator}
        line.update(key=key, reason=reason, detail=detail)
        self._rejects.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
        self._n_rejects += 1
        if key is not None:
            self.rejected_keys.add(key)

    def finish(self, total_inputs: int, seconds: float, extra: dict[str, Any] | None = None) -> Summary:
        """Close the last shard, acknowledge the end, write manifest.json atomically."""
        self._cursor = total_inputs
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._journal({"shard": None, "next_input": total_inputs, "rejects": self._n_rejects, "done": True})
        self._rejects.close()
        reasons: dict[str, int] = collections.Counter()
        with open(self._path(REJECTS), encoding="utf-8") as f:
            for ln in f:
                if ln.strip():
                    reasons[json.loads(ln)["reason"]] += 1
        summary = Summary(written=sum(s["count"] for s in self.done), rejected=sum(reasons.values()),
                          shards=len(self.done), bytes=sum(s["bytes"] for s in self.done),
                          seconds=seconds, reasons=dict(sorted(reasons.items())))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "command": self.command,
            "options": self.options,
            "shards": self.done,
            "total_samples": summary.written,
            "total_bytes": summary.bytes,
            "input_records": total_inputs,
            "rejected": summary.rejected,
            "rejects_by_reason": summary.reasons,
            **(extra or {}),
        }
        tmp = self._path(MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, self._path(MANIFEST))
        return summary

    def abort(self) -> None:
        """On an exception: leave acknowledged shards and the journal for a resume, drop the rest."""
        try:
            self._rejects.close()
        except Exception:
            pass


def ordered_map(fn: Callable[[Item], Result], items: Iterable[Item], workers: int) -> Iterator[tuple[Item, Result]]:
    """Map ``fn`` over ``items`` in parallel processes but yield in input order (determinism), with
    a bounded window so a huge input never sits in memory at once."""
    if workers <= 1:
        for it in items:
            yield it, fn(it)
        return
    window = workers * 8
    with cf.ProcessPoolExecutor(max_workers=workers) as ex:
        pending: collections.deque = collections.deque()
        for it in items:
            pending.append((it, ex.submit(fn, it)))
            if len(pending) >= window:
                it0, fut = pending.popleft()
                yield it0, fut.result()
        while pending:
            it0, fut = pending.popleft()
            yield it0, fut.result()


def safe_convert(convert: Callable[[Item], Result], item: Item) -> Result:
    """Run one conversion so that a bad record becomes a reject line, never a crash of the run."""
    from jrm_dist.data.schema import SchemaError
    try:
        return convert(item)
    except SchemaError as exc:
        return Result(key=item.key, reason=exc.reason, detail=exc.detail)
    except Exception as exc:  # noqa: BLE001 - by contract nothing in one record may stop the run
        return Result(key=item.key, reason="unexpected_error", detail=f"{type(exc).__name__}: {exc}")
