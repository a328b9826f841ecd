"""Stage 3 of the data flow: reading a slice's records from tar shards, with damage accounting.

Damage (why no good record is lost silently). Position i of a shard is its i-th *record* (a key group
with a json member), so a member that belongs to no record (a stray file, the images of a record whose
json is missing) does not shift the records after it. Everything unusable is counted once, with its
shard, byte offset and key: such members by the reader that hands out the next record; a record that
fails to decode or validate where it is handed out; the positions a truncated shard leaves without a
record where they fall (a position already explained by the counted members of a broken record is
not counted again; a stray file holds no position and explains none).
"""
from __future__ import annotations

import os
import tarfile
from typing import Any, Iterator

from webdataset import gopen
from webdataset.tariterators import base_plus_ext

from jrm_dist.data.schema import is_record_field
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


# Records (key groups with a json member) assembled at once. Groups without a json member (stray files,
# the first images of a record whose json comes later) wait alongside and do not count, so no number of
# strays between the members of one record closes it early.
OPEN_RECORDS = 4


def shard_records(stream, url: str) -> Iterator[tuple]:
    """Assemble a shard's tar members into records by key (webdataset's key prefix: the member name up to
    its first dot), tolerating unrelated members in between, and say what is not a record.

    Yields ``("record", sample, unusable_before)`` per group that has a ``json`` member, in order, where
    ``sample`` is ``{"__key__", "__offset__", field: bytes}`` and ``unusable_before`` lists the members
    since the previous record that belong to no record (entries with shard, offset, key, reason); then
    one ``("end", unusable_after, n_broken, error, stop_offset)``: ``n_broken`` counts the unusable groups
    that are broken records (only record fields, see :func:`jrm_dist.data.schema.is_record_field`) and so
    hold a position of the shard, unlike stray files; ``error`` is None or why the tar stopped reading;
    ``stop_offset`` is the byte after the last member read in full.
    """
    open_: dict[str, dict] = {}
    unusable: list[dict] = []
    n_broken = 0

    def finish(g: dict):
        nonlocal unusable, n_broken
        if "json" in g and not g.get("__dup__"):
            out, unusable = ("record", g, unusable), []
            return out
        n_broken += all(is_record_field(f) for f in g if not f.startswith("__"))
        why = f"field {g['__dup__']!r} twice" if g.get("__dup__") else \
            f"no json member (members: {', '.join(sorted(k for k in g if not k.startswith('__'))) or 'none'})"
        unusable.append(damage_entry(url, g["__offset__"], g["__key__"], f"not a record: {why}"))
        return None

    error, stop_offset = None, 0
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for m in tar:
            if not m.isreg():
                continue
            prefix, suffix = base_plus_ext(m.name)
            data = tar.extractfile(m).read()
            stop_offset = m.offset_data + m.size
            tar.members = []  # stream mode: do not keep every header
            key = prefix if prefix is not None else m.name
            g = open_.setdefault(key, {"__key__": os.path.basename(key), "__offset__": m.offset})
            field = (suffix or "").lower()
            if field in g:
                g["__dup__"] = field
            g[field] = data
            if field == "json" and sum("json" in o for o in open_.values()) > OPEN_RECORDS:
                yield from _close_oldest_record(open_, finish)
    except Exception as exc:  # noqa: BLE001 - truncated or damaged tar: what was read still counts
        error = f"{type(exc).__name__}: {exc}"
    for g in list(open_.values()):
        done = finish(g)
        if done:
            yield done
    yield ("end", unusable, n_broken, error, stop_offset)


def _close_oldest_record(open_: dict[str, dict], finish) -> Iterator[tuple]:
    """Finish the groups opened before the oldest open record, then that record (in the order they began)."""
    while open_:
        g = open_.pop(next(iter(open_)))
        done = finish(g)
        if done:
            yield done
        if "json" in g:
            return


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
        _, after, n_broken, error, stop = self._end
        have = self._idx
        why = (f"no record at position {idx}: the tar stopped reading after {have} record(s) at byte {stop} "
               f"({error})" if error else
               f"no record at position {idx}: the shard has {have} record(s), the manifest says {count}")
        # a record broken into unusable members was counted there; do not count the hole it left again (a
        # stray file holds no position, so it explains no hole)
        return Corrupt(damage_entry(url, stop, None, why), counted=idx - have >= n_broken,
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
