"""Streaming webdataset loader with an exact resume cursor and equal step counts on every rank.

Pipeline (per epoch), one module per stage of docs/DESIGN.md's data flow::

    shards.py      shard list (manifest.json / brace pattern / URLs, with per-shard sample counts)
    slices.py      -> deterministic shard shuffle (seed, epoch)
                   -> split by node, then by worker: P = world_size * num_workers equal contiguous slices
                   -> sample shuffle buffer (simulated on sample *positions*, seed, epoch, slice)
    tar_reader.py  -> read tar (webdataset gopen), assemble records by key, account for damage
    decode.py      -> json record + image bytes -> validate (images over jrm-prep's pixel cap refused
                      from their header, before any decoding)
    stream.py      -> encode_group (processor: candidates, chat template, reward token, images) -> Collator
    loader.py      this rank's loader: epochs, the resume cursor, the corrupt-record count and log

Cursor scheme (why resume is exact). Everything a worker yields is a pure function of
(seed, epoch, shard counts, world_size, num_workers, slice p): the epoch's global sample sequence is
the concatenation of the shuffled shards; slice p = rank * num_workers + worker takes positions
[p*L, (p+1)*L) of it; the shuffle buffer is run on those *positions* (not on decoded data), which
gives the slice's emission order. Batch b of slice p is emission positions [b*B, (b+1)*B). The
state is just "how many positions each slice has handed out" (plus epoch), so resuming skips the
first ``cursor`` positions without reading or decoding them, and a reader only re-reads the tar
from the oldest position still in the shuffle window. Corrupt samples count as consumed positions,
so they are skipped once and never retried or double counted.

Resume across a changed world size, worker count, batch size, seed or shard set cannot map cursors
one to one: the loader then restarts the checkpoint's epoch from its beginning and logs so.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from jrm_dist.data.shards import Shard, resolve_shards, shards_digest
from jrm_dist.data.slices import slice_length
from jrm_dist.data.stream import GroupStream

log = logging.getLogger(__name__)
STATE_VERSION = 1
MAX_CORRUPT_LOG = 10_000


def _identity(x):
    return x


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
        # Its own generator: a DataLoader iterator otherwise draws its base seed from the global RNG, which
        # shifts the dropout stream of a resumed run (restored RNG, then a new iterator) by one draw.
        kw = dict(num_workers=self.num_workers, batch_size=None, collate_fn=_identity,
                  generator=torch.Generator().manual_seed(self.epoch))
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
