"""Stage 2 of the data flow: the epoch plan. Which slice of the epoch's samples each rank x worker reads,
and in which order its bounded shuffle hands them out, as a pure function of (seed, epoch, shard counts,
world_size, num_workers, slot): no data is read to know it, which is what makes the resume cursor exact.

Equal steps (why no rank hangs ZeRO-3). Slices have equal length by construction:
``even="pad"`` (default) uses L = ceil(N / P) and wraps around to the start of the epoch's
sequence for the few missing positions (at most P - 1 samples repeated per epoch);
``even="drop"`` uses L = floor(N / P) and leaves at most P - 1 samples out (different ones each
epoch, since the shard order is reshuffled). Every worker of every rank therefore yields exactly
ceil(L / B) batches, and every rank ``len(loader)`` batches per epoch.
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from typing import Sequence

from jrm_dist.data.shards import Shard


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
