"""Stage 5 of the data flow: the per-worker stream. Each DataLoader worker walks its slice of the epoch plan,
reads the records, decodes them, encodes them with the processor and collates micro-batches; every batch carries
the worker's cursor and what was unusable, for :class:`jrm_dist.data.loader.StreamingLoader` to count.

A corrupt sample makes its batch smaller, never absent: a batch whose samples are all corrupt repeats a good
group of the same slice (the previous one; right after a start or resume, the next one).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from jrm_dist.data.decode import decode_sample
from jrm_dist.data.shards import Shard
from jrm_dist.data.slices import SlicePlan, make_plan
from jrm_dist.data.tar_reader import Corrupt, SliceReader, damage_entry


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
        if isinstance(raw, Corrupt):
            return None, raw.entry
        try:
            rec, images = decode_sample(raw)
            return self.encode_fn(rec, images), None
        except (ValueError, KeyError, TypeError, OSError) as exc:
            return None, damage_entry(plan.shards[shard].url, raw.get("__offset__"), raw.get("__key__"),
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
                    corrupt += raw.extra if isinstance(raw, Corrupt) else raw.get("__corrupt__", [])
                    group, why = self._encode(plan, x, raw)
                    if why is None:
                        groups.append(group)
                    elif isinstance(raw, Corrupt) and not raw.counted:
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
