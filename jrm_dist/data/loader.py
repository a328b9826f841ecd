"""Streaming webdataset loader with an exact resume cursor and equal step counts on every rank.

Pipeline (per epoch)::

    shard list (manifest.json / brace pattern / URLs, with per-shard sample counts)
      -> deterministic shard shuffle (seed, epoch)
      -> split by node, then by worker: P = world_size * num_workers equal contiguous slices
      -> sample shuffle buffer (simulated on sample *positions*, seed, epoch, slice)
      -> read tar (webdataset gopen + tar iterator) -> json record + image bytes -> validate
      -> encode_group (processor: candidates, chat template, reward token, images) -> Collator

Cursor scheme (why resume is exact). Everything a worker yields is a pure function of
(seed, epoch, shard counts, world_size, num_workers, slice p): the epoch's global sample sequence is
the concatenation of the shuffled shards; slice p = rank * num_workers + worker takes positions
[p*L, (p+1)*L) of it; the shuffle buffer is run on those *positions* (not on decoded data), which
gives the slice's emission order. Batch b of slice p is emission positions [b*B, (b+1)*B). The
state is just "how many positions each slice has handed out" (plus epoch), so resuming skips the
first ``cursor`` positions without reading or decoding them, and a reader only re-reads the tar
from the oldest position still in the shuffle window. Corrupt samples count as consumed positions,
so they are skipped once and never retried or double counted.

Equal steps (why no rank hangs ZeRO-3). Slices have equal length by construction:
``even="pad"`` (default) uses L = ceil(N / P) and wraps around to the start of the epoch's
sequence for the few missing positions (at most P - 1 samples repeated per epoch);
``even="drop"`` uses L = floor(N / P) and leaves at most P - 1 samples out (different ones each
epoch, since the shard order is reshuffled). Every worker of every rank therefore yields exactly
ceil(L / B) batches, and every rank ``len(loader)`` batches per epoch. A corrupt sample makes its
batch smaller, never absent: a batch whose samples are all corrupt repeats a good group of the same
slice (the previous one; right after a start or resume, the next one).

Resume across a changed world size, worker count, batch size, seed or shard set cannot map cursors
one to one: the loader then restarts the checkpoint's epoch from its beginning and logs so.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import gopen
from webdataset.tariterators import tar_file_iterator

from jrm_dist.data.schema import validate_group

log = logging.getLogger(__name__)
STATE_VERSION = 1


# ---- shard list -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    url: str    # local path, pipe:..., or http(s):// URL (anything webdataset's gopen opens)
    count: int  # samples in the shard (from the manifest, or counted once)


def _read_manifest(path: str, shard_root: str | None) -> list[Shard]:
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path}: field 'shards' is missing or not a list (not a jrm-prep manifest?)")
    root = shard_root if shard_root is not None else os.path.dirname(os.path.abspath(path))
    out = []
    for i, s in enumerate(manifest["shards"]):
        if "name" not in s or "count" not in s:
            raise ValueError(f"{path}: shards[{i}] lacks 'name' or 'count'")
        url = s["name"] if "://" in s["name"] or s["name"].startswith("pipe:") else _join(root, s["name"])
        out.append(Shard(url, int(s["count"])))
    return out


def _join(root: str, name: str) -> str:
    if "://" in root or root.startswith("pipe:"):
        return root.rstrip("/") + "/" + name
    return os.path.join(root, name)


def count_samples(url: str) -> int:
    """Number of samples in one shard (one pass over its tar headers)."""
    n, last = 0, None
    with gopen(url, "rb") as stream:
        for member in tarfile.open(fileobj=stream, mode="r|*"):
            key = os.path.basename(member.name).split(".", 1)[0]
            if member.isreg() and key != last:
                n, last = n + 1, key
    return n


def resolve_shards(spec: str | Sequence[str], shard_root: str | None = None) -> list[Shard]:
    """Shards from a manifest.json, a folder holding one, a brace pattern, or a list of URLs.

    Without a manifest the sample counts (needed for equal steps and the cursor) come from a
    manifest.json next to local shards when it lists them, else from one counting pass (logged).
    """
    if not spec:
        raise ValueError("no shards given (data.train_shards / eval_shards is empty)")
    if isinstance(spec, str):
        if os.path.isdir(spec):
            spec = os.path.join(spec, "manifest.json")
        if spec.endswith(".json"):
            if not os.path.exists(spec):
                raise FileNotFoundError(f"manifest {spec} does not exist")
            return _read_manifest(spec, shard_root)
        urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
    else:
        urls = list(spec)
    if not urls:
        raise ValueError("empty shard list")
    counts: dict[str, int] = {}
    for folder in {os.path.dirname(os.path.abspath(u)) for u in urls if "://" not in u and not u.startswith("pipe:")}:
        mpath = os.path.join(folder, "manifest.json")
        if os.path.exists(mpath):
            for s in _read_manifest(mpath, None):
                counts[os.path.abspath(s.url)] = s.count
    shards = []
    for u in urls:
        c = counts.get(os.path.abspath(u)) if "://" not in u and not u.startswith("pipe:") else None
        if c is None:
            log.warning("no manifest entry for %s: counting its samples (one extra read)", u)
            c = count_samples(u)
        shards.append(Shard(u, c))
    return shards


def shards_digest(shards: Sequence[Shard]) -> str:
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{os.path.basename(s.url)}\t{s.count}\n".encode())
    return h.hexdigest()[:16]


# ---- the deterministic plan -----------------------------------------------------------------------

def epoch_shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    order = list(range(n_shards))
    if shuffle:
        random.Random(f"jrm-shards:{seed}:{epoch}").shuffle(order)
    return order


def slice_length(n_samples: int, n_slices: int, even: str) -> int:
    if even == "pad":
        return math.ceil(n_samples / n_slices)
    if even == "drop":
        return n_samples // n_slices
    raise ValueError(f"even must be 'pad' or 'drop', got {even!r}")


def shuffle_order(length: int, bufsize: int, seed: int, epoch: int, slot: int) -> list[int]:
    """Emission order of a shuffle buffer of ``bufsize`` over positions 0..length-1.

    Same semantics as webdataset's shuffle (fill, then emit a random element per new one, drain at
    the end), but on positions, so the order is known without reading any data.
    """
    if bufsize <= 1:
        return list(range(length))
    rng = random.Random(f"jrm-buffer:{seed}:{epoch}:{slot}")
    buf: list[int] = []
    out: list[int] = []
    for x in range(length):
        buf.append(x)
        if len(buf) >= bufsize:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out.append(buf.pop())
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        out.append(buf.pop())
    return out


@dataclass
class SlicePlan:
    """Where slice ``slot`` of an epoch reads: positions map to (shard index, sample index)."""

    shards: Sequence[Shard]
    order: list[int]     # shard indices in epoch order
    cum: list[int]       # cumulative sample counts along ``order``
    start: int           # first global position of the slice
    length: int          # L
    emission: list[int]  # slice-relative positions in the order they are handed out

    def locate(self, x: int) -> tuple[int, int]:
        """Slice position -> (shard index, sample index in that shard); wraps around (pad)."""
        g = (self.start + x) % self.cum[-1]
        j = bisect.bisect_right(self.cum, g) - 1
        return self.order[j], g - self.cum[j]


def make_plan(shards: Sequence[Shard], *, epoch: int, slot: int, n_slots: int, seed: int, bufsize: int,
              even: str = "pad", shuffle_shards: bool = True) -> SlicePlan:
    order = epoch_shard_order(len(shards), seed, epoch, shuffle_shards)
    cum = [0]
    for i in order:
        cum.append(cum[-1] + shards[i].count)
    n = cum[-1]
    if n == 0:
        raise ValueError("the shard list holds no samples")
    length = slice_length(n, n_slots, even)
    if length == 0:
        raise ValueError(f"{n} samples cannot feed {n_slots} rank x worker slices with even='drop'")
    return SlicePlan(shards, order, cum, slot * length, length,
                     shuffle_order(length, bufsize, seed, epoch, slot))


# ---- reading ------------------------------------------------------------------------------------

class _Corrupt:
    """Marker for a position that could not be read/decoded; ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason


class SliceReader:
    """Reads the samples of a slice sequentially and hands them out in emission order.

    Only positions still to be emitted are kept (at most about the shuffle buffer size)."""

    def __init__(self, plan: SlicePlan, cursor: int):
        self.plan = plan
        self.cursor = cursor
        self.pending = set(plan.emission[cursor:])
        self.next_pos = min(self.pending) if self.pending else plan.length
        self.held: dict[int, Any] = {}
        self._shard: int | None = None
        self._it: Iterator | None = None
        self._idx = 0            # index of the next sample the open iterator yields
        self._dead: str | None = None
        self._stream = None

    def _open(self, shard: int) -> None:
        self.close()
        self._shard, self._idx, self._dead = shard, 0, None
        url = self.plan.shards[shard].url
        try:
            self._stream = gopen(url, "rb")
            self._it = self._group(tar_file_iterator(self._stream))
        except Exception as exc:  # noqa: BLE001 - an unopenable shard makes its samples corrupt
            self._dead = f"cannot open shard {url}: {type(exc).__name__}: {exc}"

    @staticmethod
    def _group(files: Iterator[dict]) -> Iterator[dict]:
        """Tar members -> samples (adjacent members with the same key)."""
        current: dict | None = None
        for f in files:
            key, _, field = os.path.basename(f["fname"]).partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[field.lower()] = f["data"]
        if current is not None:
            yield current

    def _read(self, shard: int, idx: int) -> Any:
        if self._shard != shard or self._idx > idx:
            self._open(shard)
        url = self.plan.shards[shard].url
        while self._dead is None and self._idx <= idx:
            try:
                sample = next(self._it)
            except StopIteration:
                self._dead = f"shard {url} ended after {self._idx} samples (manifest says {self.plan.shards[shard].count})"
                break
            except Exception as exc:  # noqa: BLE001 - truncated/corrupt tar
                self._dead = f"shard {url} unreadable after sample {self._idx}: {type(exc).__name__}: {exc}"
                break
            self._idx += 1
            if self._idx - 1 == idx:
                return sample
        return _Corrupt(self._dead or "unreadable")

    def peek(self, x: int) -> Any:
        """The raw sample at slice position ``x`` (a dict of bytes) or a _Corrupt marker; kept."""
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


def decode_sample(raw: dict[str, bytes]) -> tuple[dict, dict[str, bytes]]:
    """json record + image bytes of one shard sample; raises ValueError naming the sample."""
    key = raw.get("__key__")
    if "json" not in raw:
        raise ValueError(f"sample {key!r} has no json record")
    try:
        rec = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"sample {key!r}: json record does not parse: {exc}") from None
    images = {k: v for k, v in raw.items() if k not in ("__key__", "json")}
    validate_group(rec, set(images))
    return rec, images


# ---- dataset (runs in each DataLoader worker) -----------------------------------------------------

def _identity(x):
    return x


class GroupStream(IterableDataset):
    """Yields whole micro-batches for one rank; each worker walks its own slice (see module doc)."""

    def __init__(self, shards: Sequence[Shard], encode_fn: Callable[[dict, dict], Any],
                 collate_fn: Callable[[list], dict], *, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int = 0, shuffle_buffer: int = 64, even: str = "pad",
                 shuffle_shards: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if batch_size < 1:
            raise ValueError("batch_size (groups per micro-batch) must be >= 1")
        self.shards = list(shards)
        self.encode_fn, self.collate_fn = encode_fn, collate_fn
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.n_workers = max(1, num_workers)
        self.seed, self.shuffle_buffer, self.even, self.shuffle_shards = seed, shuffle_buffer, even, shuffle_shards
        # set by StreamingLoader before each epoch (copied into the worker processes)
        self.epoch = 0
        self.cursors = [0] * self.n_workers
        self.rotation = 0

    def plan(self, epoch: int, worker_slot: int) -> SlicePlan:
        return make_plan(self.shards, epoch=epoch, slot=self.rank * self.n_workers + worker_slot,
                         n_slots=self.world_size * self.n_workers, seed=self.seed, bufsize=self.shuffle_buffer,
                         even=self.even, shuffle_shards=self.shuffle_shards)

    def _encode(self, plan: SlicePlan, x: int, raw: Any) -> tuple[Any, str | None]:
        """(encoded group, None) or (None, why it is corrupt: shard#index, key, reason)."""
        shard, idx = plan.locate(x)
        where = f"{os.path.basename(plan.shards[shard].url)}#{idx}"
        if isinstance(raw, _Corrupt):
            return None, f"{where}: {raw.reason}"
        try:
            rec, images = decode_sample(raw)
            return self.encode_fn(rec, images), None
        except (ValueError, KeyError, TypeError, OSError) as exc:
            return None, f"{where} ({raw.get('__key__')}): {type(exc).__name__}: {exc}"

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        # DataLoader hands out batches round-robin from worker 0; rotating the worker -> slot map
        # makes a resumed run continue with the slot that was next, so the order is exact too.
        slot = (wid + self.rotation) % self.n_workers
        plan = self.plan(self.epoch, slot)
        cursor = self.cursors[slot]
        reader = SliceReader(plan, cursor)
        last_good = None
        try:
            while cursor < plan.length:
                end = min(cursor + self.batch_size, plan.length)
                groups, corrupt = [], []
                for x in plan.emission[cursor:end]:
                    group, why = self._encode(plan, x, reader.get(x))
                    if why is None:
                        groups.append(group)
                    else:
                        corrupt.append(why)
                substituted = 0
                if groups:
                    last_good = groups[-1]
                else:  # keep the step: repeat the last good group, or borrow the next one (read again later)
                    if last_good is None:
                        last_good = next((g for g, why in (self._encode(plan, x, reader.peek(x))
                                                           for x in plan.emission[end:]) if why is None), None)
                    if last_good is None:
                        raise RuntimeError(f"rank {self.rank} worker slot {slot} epoch {self.epoch}: every sample "
                                           f"of this slice is corrupt, e.g. {corrupt[:3]}")
                    groups, substituted = [last_good], 1
                batch = self.collate_fn(groups)
                cursor = end
                batch["loader"] = {"slot": slot, "cursor": cursor, "epoch": self.epoch, "corrupt": corrupt,
                                   "substituted": substituted}
                yield batch
        finally:
            reader.close()


# ---- the loader the training loop uses --------------------------------------------------------------

class StreamingLoader:
    """One rank's view of the data: iterate it for one epoch of micro-batches; checkpoint it with
    ``state_dict()`` (a batch counts as consumed once it is handed out)."""

    def __init__(self, shards: str | Sequence[str] | Sequence[Shard], encode_fn: Callable[[dict, dict], Any],
                 collate_fn: Callable[[list], dict], *, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 64, even: str = "pad",
                 shuffle_shards: bool = True, shard_root: str | None = None, prefetch_factor: int = 2):
        if shards and isinstance(shards, (list, tuple)) and isinstance(shards[0], Shard):
            resolved = list(shards)
        else:
            resolved = resolve_shards(shards, shard_root)
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.dataset = GroupStream(resolved, encode_fn, collate_fn, batch_size=batch_size, rank=rank,
                                   world_size=world_size, num_workers=num_workers, seed=seed,
                                   shuffle_buffer=shuffle_buffer, even=even, shuffle_shards=shuffle_shards)
        self.epoch = 0
        self.cursors = [0] * self.dataset.n_workers
        self.next_slot = 0
        self.corrupt_samples = 0
        self.substituted_batches = 0
        self.recent_corrupt: list[str] = []

    @classmethod
    def from_config(cls, data_cfg, processor, *, rank: int, world_size: int, shards: str | None = None,
                    **kw) -> "StreamingLoader":
        """Build from ``DataConfig`` with the lead's processor/collate (encode_group + Collator)."""
        import functools

        from jrm_dist.data.collate import Collator, encode_group
        from jrm_dist.data.packing import PackedCollator
        enc = functools.partial(_encode, processor=processor, rank_by=data_cfg.rank_by,
                                use_rationale=data_cfg.use_rationale, encode_group=encode_group)
        collate = PackedCollator(processor) if data_cfg.packing == "group" else Collator(processor)
        return cls(shards or data_cfg.train_shards, enc, collate, batch_size=data_cfg.groups_per_batch,
                   rank=rank, world_size=world_size, num_workers=data_cfg.num_workers, seed=data_cfg.seed,
                   shuffle_buffer=data_cfg.shuffle_buffer, **kw)

    # -- sizes
    @property
    def samples_per_slot(self) -> int:
        d = self.dataset
        n = sum(s.count for s in d.shards)
        return slice_length(n, d.world_size * d.n_workers, d.even)

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank: the same on every rank."""
        return self.dataset.n_workers * math.ceil(self.samples_per_slot / self.dataset.batch_size)

    # -- iteration
    def __iter__(self) -> Iterator[dict]:
        d = self.dataset
        d.epoch, d.cursors, d.rotation = self.epoch, list(self.cursors), self.next_slot
        if all(c >= self.samples_per_slot for c in self.cursors):  # checkpoint taken at the very end
            self._next_epoch()
            d.epoch, d.cursors, d.rotation = self.epoch, list(self.cursors), 0
        kw = dict(num_workers=self.num_workers, batch_size=None, collate_fn=_identity)
        if self.num_workers > 0:
            kw.update(prefetch_factor=self.prefetch_factor, persistent_workers=False)
        for batch in DataLoader(d, **kw):
            meta = batch.pop("loader")
            self.cursors[meta["slot"]] = meta["cursor"]
            self.next_slot = (meta["slot"] + 1) % d.n_workers
            if meta["corrupt"]:
                self.corrupt_samples += len(meta["corrupt"])
                self.recent_corrupt = (self.recent_corrupt + meta["corrupt"])[-20:]
                for msg in meta["corrupt"]:
                    log.warning("skipped corrupt sample %s", msg)
            self.substituted_batches += meta["substituted"]
            yield batch
        self._next_epoch()

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.cursors = [0] * self.dataset.n_workers
        self.next_slot = 0

    def stats(self) -> dict[str, float]:
        """Counters for tracking (MLflow): corrupt samples skipped so far, batches that repeated a group."""
        return {"data/corrupt_samples": float(self.corrupt_samples),
                "data/substituted_batches": float(self.substituted_batches), "data/epoch": float(self.epoch)}

    # -- checkpointing
    def _layout(self) -> dict[str, Any]:
        d = self.dataset
        return {"world_size": d.world_size, "num_workers": d.n_workers, "batch_size": d.batch_size, "seed": d.seed,
                "shuffle_buffer": d.shuffle_buffer, "even": d.even, "shuffle_shards": d.shuffle_shards,
                "shards": shards_digest(d.shards)}

    def state_dict(self) -> dict[str, Any]:
        epoch, cursors, next_slot = self.epoch, list(self.cursors), self.next_slot
        if all(c >= self.samples_per_slot for c in cursors):  # the epoch's last batch was handed out
            epoch, cursors, next_slot = epoch + 1, [0] * len(cursors), 0
        return {"version": STATE_VERSION, "rank": self.dataset.rank, "epoch": epoch, "cursors": cursors,
                "next_slot": next_slot, "corrupt_samples": self.corrupt_samples,
                "substituted_batches": self.substituted_batches, **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accepts this rank's state, or {"ranks": [state of rank 0, rank 1, ...]} (a gathered checkpoint)."""
        if "ranks" in state:
            ranks = state["ranks"]
            mine = [s for s in ranks if s.get("rank") == self.dataset.rank]
            state = mine[0] if mine else ranks[0]
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        self.corrupt_samples = int(state.get("corrupt_samples", 0))
        self.substituted_batches = int(state.get("substituted_batches", 0))
        self.epoch = int(state["epoch"])
        old = {k: state.get(k) for k in self._layout()}
        new = self._layout()
        if old == new and state.get("rank") == self.dataset.rank:
            self.cursors = [int(c) for c in state["cursors"]]
            self.next_slot = int(state["next_slot"])
            return
        changed = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in new if old[k] != new[k]) or "rank"
        log.warning("data layout changed since the checkpoint (%s): resuming at the start of epoch %d; "
                    "samples of that epoch seen before the checkpoint will be seen again", changed, self.epoch)
        self.cursors = [0] * self.dataset.n_workers
        self.next_slot = 0


def _encode(rec: dict, images: dict, *, processor, rank_by: str, use_rationale: bool, encode_group):
    return encode_group(processor, rec, images, rank_by=rank_by, use_rationale=use_rationale)
