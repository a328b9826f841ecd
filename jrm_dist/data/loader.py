"""Streaming webdataset loader with an exact resume cursor and equal step counts on every rank.

Pipeline (per epoch)::

    shard list (manifest.json / brace pattern / URLs, with per-shard sample counts)
      -> deterministic shard shuffle (seed, epoch)
      -> split by node, then by worker: P = world_size * num_workers equal contiguous slices
      -> sample shuffle buffer (simulated on sample *positions*, seed, epoch, slice)
      -> read tar (webdataset gopen), assemble records by key -> json record + image bytes -> validate
         (images over jrm-prep's pixel cap are refused from their header, before any decoding)
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

Damage (why no good record is lost silently). Position i of a shard is its i-th *record* (a key group
with a json member), so a member that belongs to no record (a stray file, the images of a record whose
json is missing) does not shift the records after it. Everything unusable is counted once, with its
shard, byte offset and key: such members by the reader that hands out the next record; a record that
fails to decode or validate where it is handed out; the positions a truncated shard leaves without a
record where they fall (a position already explained by a counted member is not counted again).

Resume across a changed world size, worker count, batch size, seed or shard set cannot map cursors
one to one: the loader then restarts the checkpoint's epoch from its beginning and logs so.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import math
import os
import random
import tarfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import gopen
from webdataset.tariterators import base_plus_ext

from jrm_dist.data.schema import validate_group

log = logging.getLogger(__name__)
STATE_VERSION = 1
MAX_CORRUPT_LOG = 10_000


# ---- shard list -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    url: str    # local path, pipe:..., or http(s):// URL (anything webdataset's gopen opens)
    count: int  # samples in the shard (from the manifest, or counted once)
    sha256: str | None = None  # from the manifest (data.verify checks it)


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
        out.append(Shard(url, int(s["count"]), s.get("sha256")))
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


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def resolve_config_shards(key: str, spec: str) -> list[Shard]:
    """:func:`resolve_shards` for a config key (``data.train_shards``): fails fast, naming the key, when
    the path or a local shard does not exist (instead of a reader error once training started)."""
    if not spec:
        raise ValueError(f"{key} is empty: point it at a jrm-prep output folder or its manifest.json")
    if _is_local(spec) and "{" not in spec and "::" not in spec and not os.path.exists(spec):
        raise FileNotFoundError(f"{key}={spec!r} does not exist (expected a jrm-prep output folder, its "
                                "manifest.json, or a shard pattern such as shards/shard-{000000..000099}.tar)")
    try:
        shards = resolve_shards(spec)
    except (OSError, ValueError) as exc:
        raise type(exc)(f"{key}={spec!r}: {exc}") from None
    missing = [s.url for s in shards if _is_local(s.url) and not os.path.exists(s.url)]
    if missing:
        raise FileNotFoundError(f"{key}={spec!r}: {len(missing)} shard(s) missing, e.g. {', '.join(missing[:3])}")
    return shards


def verify_shards(key: str, shards: Sequence[Shard]) -> list[str]:
    """sha256 of every local shard against its manifest entry (data.verify); returns the problems."""
    problems = []
    for s in shards:
        if not _is_local(s.url):
            continue
        if not s.sha256:
            problems.append(f"{key}: {s.url}: no sha256 in a manifest to check against (data.verify=true "
                            "needs a jrm-prep manifest.json)")
            continue
        with open(s.url, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != s.sha256:
            problems.append(f"{key}: shard {s.url}: sha256 {digest}, manifest says {s.sha256} (changed or damaged "
                            "since jrm-prep wrote it; `jrm-prep verify` re-checks every record)")
    return problems


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
    """Marker for a position without a usable record. ``entry`` says where and why (shard, offset, key,
    reason); ``counted`` is False when the loss is already counted through another entry (a record
    without its json is counted where its members are met; the position it leaves empty at the end of
    the shard is not counted a second time). ``extra``: unusable members met on the way."""

    def __init__(self, entry: dict, counted: bool = True, extra: list[dict] | None = None):
        self.entry, self.counted, self.extra = entry, counted, extra or []
        self.reason = entry["reason"]


def _entry(url: str, offset: int | None, key: str | None, reason: str) -> dict:
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
        unusable.append(_entry(url, g["__offset__"], g["__key__"], f"not a record: {why}"))
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
            return _Corrupt(_entry(url, None, None, self._dead))
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
        return _Corrupt(_entry(url, None, None, why), counted=idx - have >= n_unusable,
                        extra=list(after) if idx == have else [])

    def _drain(self, url: str, count: int) -> list[dict]:
        extra = []
        for item in self._it:
            if item[0] == "end":
                self._end = item
                return extra + list(item[1])
            extra += list(item[2])
            extra.append(_entry(url, item[1]["__offset__"], item[1]["__key__"],
                                f"record beyond the manifest's count of {count} for this shard"))
            self._idx += 1
        return extra

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
    images = {k: v for k, v in raw.items() if not k.startswith("__") and k != "json"}
    validate_group(rec, set(images))
    cap = image_pixel_cap()
    for name in list(rec.get("source_images") or []) + [n for c in rec["candidates"] for n in c.get("images") or []]:
        w, h = image_size(images[name], f"sample {key!r} field {name!r}")
        if w * h > cap:
            raise ValueError(f"sample {key!r} field {name!r}: {w}x{h} = {w * h / 1e6:.1f} Mpx is over jrm-prep's "
                             f"decoded-pixel cap of {cap / 1e6:.1f} Mpx (PIL.Image.MAX_IMAGE_PIXELS); not decoded")
    return rec, images


def image_pixel_cap() -> int:
    """jrm-prep's decoded-pixel cap: data_prep.images.check_image turns Pillow's DecompressionBombWarning
    into a reject, i.e. refuses more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels. The loader refuses the
    same images (a hand-made or foreign shard can hold one) before decoding them."""
    return int(Image.MAX_IMAGE_PIXELS)


def image_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) from the image header only (Pillow opens lazily; no pixel is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller applies the cap
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad headers
        raise ValueError(f"{what}: cannot read the image header ({type(exc).__name__}: {exc})") from None


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

    def _encode(self, plan: SlicePlan, x: int, raw: Any) -> tuple[Any, dict | None]:
        """(encoded group, None) or (None, why it is not usable: shard, offset, key, reason)."""
        shard, _ = plan.locate(x)
        if isinstance(raw, _Corrupt):
            return None, raw.entry
        try:
            rec, images = decode_sample(raw)
            return self.encode_fn(rec, images), None
        except (ValueError, KeyError, TypeError, OSError) as exc:
            return None, _entry(plan.shards[shard].url, raw.get("__offset__"), raw.get("__key__"),
                                f"{type(exc).__name__}: {exc}")

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
                groups, corrupt, uncounted = [], [], []
                for x in plan.emission[cursor:end]:
                    raw = reader.get(x)
                    corrupt += raw.extra if isinstance(raw, _Corrupt) else raw.get("__corrupt__", [])
                    group, why = self._encode(plan, x, raw)
                    if why is None:
                        groups.append(group)
                    elif isinstance(raw, _Corrupt) and not raw.counted:
                        uncounted.append(why)
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
                                           f"of this slice is corrupt, e.g. {(corrupt + uncounted)[:3]}")
                    groups, substituted = [last_good], 1
                batch = self.collate_fn(groups)
                cursor = end
                batch["loader"] = {"slot": slot, "cursor": cursor, "epoch": self.epoch, "corrupt": corrupt,
                                   "uncounted": uncounted, "substituted": substituted}
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
        self.epoch_corrupt = 0  # this epoch's (for data.max_corrupt_fraction)
        self.substituted_batches = 0
        self.corrupt_log: list[dict] = []  # what was skipped (shard, offset, key, reason), the last MAX_CORRUPT_LOG

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
                self.epoch_corrupt += len(meta["corrupt"])
                self.corrupt_log = (self.corrupt_log + meta["corrupt"])[-MAX_CORRUPT_LOG:]
                for e in meta["corrupt"]:
                    log.warning("skipped corrupt record: %s", json.dumps(e))
            for e in meta["uncounted"]:
                log.info("position without a record, counted with the unusable members above: %s", json.dumps(e))
            self.substituted_batches += meta["substituted"]
            yield batch
        self._next_epoch()

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.epoch_corrupt = 0
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
                "epoch_corrupt": self.epoch_corrupt if epoch == self.epoch else 0,
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
        self.epoch_corrupt = int(state.get("epoch_corrupt", 0))
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
