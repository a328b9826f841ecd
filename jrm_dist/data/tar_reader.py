"""Stage 3 of the data flow: reading a slice's records from tar shards, with damage accounting.

Damage (why no good record is lost silently). Position i of a shard is its i-th *record* (a key group
with a json member), so a member that belongs to no record (a stray file, the images of a record whose
json is missing) does not shift the records after it. Everything unusable is counted once, with its
shard, byte offset and key: such members by the reader that hands out the next record; a record that
fails to decode or validate where it is handed out; the positions a truncated shard leaves without a
record where they fall (a position already explained by a counted member is not counted again).
"""
from __future__ import annotations

import os
import tarfile
from typing import Any, Iterator

from webdataset import gopen
from webdataset.tariterators import base_plus_ext

from jrm_dist.data.slices import SlicePlan


class Corrupt:
    """Marker for a position without a usable record. ``entry`` says where and why (shard, offset, key,
    reason); ``counted`` is False when the loss is already counted through another entry (a record
    without its json is counted where its members are met; the position it leaves empty at the end of
    the shard is not counted a second time). ``extra``: unusable members met on the way."""

    def __init__(self, entry: dict, counted: bool = True, extra: list[dict] | None = None):
        self.entry, self.counted, self.extra = entry, counted, extra or []
        self.reason = entry["reason"]


def damage_entry(url: str, offset: int | None, key: str | None, reason: str) -> dict:
    return {"shard": os.path.basename(url), "offset": offset, "key": key, "reason": reason}


OPEN_GROUPS = 4  # records assembled at once: a stray member between two members of one record is tolerated


def shard_records(stream, url: str) -> Iterator[tuple]:
    """Assemble a shard's tar members into records by key (webdataset's key prefix: the member name up to
    its first dot), tolerating unrelated members in between, and say what is not a record.

    Yields ``("record", sample, unusable_before)`` per group that has a ``json`` member, in order, where
    ``sample`` is ``{"__key__", "__offset__", field: bytes}`` and ``unusable_before`` lists the members
    since the previous record that belong to no record (entries with shard, offset, key, reason); then
    one ``("end", unusable_after, n_unusable, error)``; ``error`` is None or why the tar stopped reading.
    """
    open_: dict[str, dict] = {}
    unusable: list[dict] = []
    n_unusable = 0

    def finish(g: dict):
        nonlocal unusable, n_unusable
        if "json" in g and not g.get("__dup__"):
            out, unusable = ("record", g, unusable), []
            return out
        n_unusable += 1
        why = f"field {g['__dup__']!r} twice" if g.get("__dup__") else \
            f"no json member (members: {', '.join(sorted(k for k in g if not k.startswith('__'))) or 'none'})"
        unusable.append(damage_entry(url, g["__offset__"], g["__key__"], f"not a record: {why}"))
        return None

    error = None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for m in tar:
            if not m.isreg():
                continue
            prefix, suffix = base_plus_ext(m.name)
            data = tar.extractfile(m).read()
            tar.members = []  # stream mode: do not keep every header
            key = prefix if prefix is not None else m.name
            g = open_.get(key)
            if g is None:
                g = open_[key] = {"__key__": os.path.basename(key), "__offset__": m.offset}
                if len(open_) > OPEN_GROUPS:
                    done = finish(open_.pop(next(iter(open_))))
                    if done:
                        yield done
            field = (suffix or "").lower()
            if field in g:
                g["__dup__"] = field
            g[field] = data
    except Exception as exc:  # noqa: BLE001 - truncated or damaged tar: what was read still counts
        error = f"{type(exc).__name__}: {exc}"
    for g in list(open_.values()):
        done = finish(g)
        if done:
            yield done
    yield ("end", unusable, n_unusable, error)


class SliceReader:
    """Reads the samples of a slice sequentially and hands them out in emission order.

    Only positions still to be emitted are kept (at most about the shuffle buffer size). Position i of a
    shard is its i-th record (see :func:`shard_records`): members that belong to no record do not shift
    the records after them; each is reported once, with the record that follows it."""

    def __init__(self, plan: SlicePlan, cursor: int):
        self.plan = plan
        self.cursor = cursor
        self.pending = set(plan.emission[cursor:])
        self.next_pos = min(self.pending) if self.pending else plan.length
        self.held: dict[int, Any] = {}
        self._shard: int | None = None
        self._it: Iterator | None = None
        self._idx = 0            # index of the next record the open iterator yields
        self._end: tuple | None = None
        self._dead: str | None = None
        self._stream = None

    def _open(self, shard: int) -> None:
        self.close()
        self._shard, self._idx, self._end, self._dead = shard, 0, None, None
        url = self.plan.shards[shard].url
        try:
            self._stream = gopen(url, "rb")
            self._it = shard_records(self._stream, url)
        except Exception as exc:  # noqa: BLE001 - an unopenable shard makes its samples corrupt
            self._dead = f"cannot open shard {url}: {type(exc).__name__}: {exc}"

    def _read(self, shard: int, idx: int) -> Any:
        if self._shard != shard or self._idx > idx:
            self._open(shard)
        url, count = self.plan.shards[shard].url, self.plan.shards[shard].count
        if self._dead is not None:
            return Corrupt(damage_entry(url, None, None, self._dead))
        while self._end is None and self._idx <= idx:
            item = next(self._it)
            if item[0] == "end":
                self._end = item
                break
            _, sample, before = item
            self._idx += 1
            if self._idx - 1 == idx:
                sample["__corrupt__"] = list(before)
                if idx == count - 1:  # the shard's last position also reports what follows it
                    sample["__corrupt__"] += self._drain(url, count)
                return sample
        _, after, n_unusable, error = self._end
        have = self._idx
        why = (f"no record at position {idx}: the tar stopped reading after {have} record(s) ({error})" if error
               else f"no record at position {idx}: the shard has {have} record(s), the manifest says {count}")
        # a record broken into unusable members was counted there; do not count the hole it left again
        return Corrupt(damage_entry(url, None, None, why), counted=idx - have >= n_unusable,
                        extra=list(after) if idx == have else [])

    def _drain(self, url: str, count: int) -> list[dict]:
        extra = []
        for item in self._it:
            if item[0] == "end":
                self._end = item
                return extra + list(item[1])
            extra += list(item[2])
            extra.append(damage_entry(url, item[1]["__offset__"], item[1]["__key__"],
                                f"record beyond the manifest's count of {count} for this shard"))
            self._idx += 1
        return extra

    def peek(self, x: int) -> Any:
        """The raw sample at slice position ``x`` (a dict of bytes) or a Corrupt marker; kept."""
        while x not in self.held:
            pos = self.next_pos
            self.next_pos += 1
            if pos in self.pending:
                self.held[pos] = self._read(*self.plan.locate(pos))
        return self.held[x]

    def get(self, x: int) -> Any:
        """Like peek, and the position is handed out (forgotten)."""
        self.peek(x)
        self.pending.discard(x)
        return self.held.pop(x)

    def close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:  # noqa: BLE001
                pass
        self._stream, self._it = None, None
