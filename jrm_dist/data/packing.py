"""Group packing (``data.packing: group``): a micro-batch becomes ONE packed row with no padding.

Unpacked, each of a group's K candidates repeats the group's shared prefix (chat header + source
image(s)) and the micro-batch is right-padded to its longest candidate. Packed, each group is laid
out as ``[prefix][suffix_1]...[suffix_K]`` and the groups follow each other in a single row:

* attention is a tree mask: prefix tokens attend causally within the prefix; candidate k's suffix
  tokens attend to the whole prefix and causally to their own suffix, never to another candidate
  or another group (the model runs it as gathered segment attention; see ``jrm_dist.model``);
* position ids are each candidate's own 3-D MRoPE ids as a separate sequence: the model runs the
  backbone's ``get_rope_index`` on every candidate's unpacked sequence (``pack_index`` maps unpacked
  positions to packed ones) and scatters them into the row;
* each distinct image (identical grid and pixels) is encoded once per micro-batch: ``pixel_values``
  holds the distinct images, ``image_index`` says which one fills each image block of the row;
* labels keep their unpacked meaning under the usual shift (``labels[:, 1:]`` is the target of
  position t): a candidate's first suffix token is a prompt token (label -100), so no position
  ever predicts the next candidate's first token. The LM loss and ``objective.local_items`` are
  therefore the same code for both layouts.

A group whose candidates do not share their prefix tokens and source pixels is packed with an empty
prefix (each candidate whole, still no padding): nothing is ever shared that is not identical.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

from jrm_dist.data.collate import group_pairs
from jrm_dist.processing import IGNORE_INDEX, Encoded, RewardProcessor, dummy_vision_inputs


def _image_slices(enc: Encoded) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pixel rows, grid [3]) of each image of a candidate, in sequence order."""
    if enc.image_grid_thw is None:
        return []
    out, start = [], 0
    for g in enc.image_grid_thw:
        n = int(g.prod())
        out.append((enc.pixel_values[start:start + n], g))
        start += n
    return out


def shared_prefix(cands: Sequence[Encoded], merge: int) -> tuple[int, int]:
    """(prefix tokens, prefix images) the candidates can share, or (0, 0) when they cannot.

    Shared only if the prefix tokens are identical, the prefix holds whole images only, those
    images' grids and pixels are identical, and the prefix holds no labelled token."""
    p = min(c.prefix_len for c in cands)
    n_img = min(c.prefix_images for c in cands)
    if p <= 0:
        return 0, 0
    first = cands[0]
    ref_imgs = _image_slices(first)[:n_img]
    img_tokens = sum(int(g.prod()) // merge**2 for _, g in ref_imgs)
    if int(first.mm_token_type_ids[:p].sum()) != img_tokens:
        return 0, 0  # the boundary would cut an image block
    for c in cands:
        if not torch.equal(c.input_ids[:p], first.input_ids[:p]):
            return 0, 0
        if (c.labels[:p + 1] != IGNORE_INDEX).any():
            return 0, 0
        imgs = _image_slices(c)[:n_img]
        if len(imgs) != n_img or any(not torch.equal(g, rg) or not torch.equal(pv, rpv)
                                     for (pv, g), (rpv, rg) in zip(imgs, ref_imgs)):
            return 0, 0
    return p, n_img


def _fingerprint(pv: torch.Tensor, grid: torch.Tensor) -> tuple:
    """Cheap bucket key of an image (grid + sums of its first and last patch rows). Only buckets:
    images are the same only if ``torch.equal`` says so (hashing every pixel cost more than the match)."""
    return (tuple(grid.tolist()), float(pv[0].double().sum()), float(pv[-1].double().sum()))


class _ImageTable:
    """Distinct images of a micro-batch (exact match on grid and pixels), in first-seen order."""

    def __init__(self):
        self.pixels: list[torch.Tensor] = []
        self.grids: list[torch.Tensor] = []
        self.by_hash: dict[tuple, list[int]] = {}
        self.slots: list[int] = []  # distinct-image index of each image block of the packed row

    def add(self, pv: torch.Tensor, grid: torch.Tensor) -> None:
        key = _fingerprint(pv, grid)
        for i in self.by_hash.get(key, []):
            if torch.equal(self.pixels[i], pv):
                self.slots.append(i)
                return
        self.by_hash.setdefault(key, []).append(len(self.pixels))
        self.slots.append(len(self.pixels))
        self.pixels.append(pv)
        self.grids.append(grid)


def pack(groups: Sequence[Sequence[Encoded]], merge: int) -> dict[str, Any]:
    """Pack groups of candidates into one row. Candidates keep their order (group by group), so
    ``mu[i]``, ``reward_pos[i]`` and pair indices refer to the same candidate as in the unpacked batch."""
    ids, labels, mm = [], [], []
    reward_pos, prefix_spans, branches, index_rows = [], [], [], []
    rope_grids = []
    images = _ImageTable()
    pos = 0
    shared_tokens = 0
    for gi, cands in enumerate(groups):
        p, n_img = shared_prefix(cands, merge)
        first = cands[0]
        prefix_spans.append((pos, p))
        if p:
            ids.append(first.input_ids[:p])
            labels.append(first.labels[:p])
            mm.append(first.mm_token_type_ids[:p])
            for pv, g in _image_slices(first)[:n_img]:
                images.add(pv, g)
            shared_tokens += p * (len(cands) - 1)
        prefix_start = pos
        pos += p
        for c in cands:
            n = c.input_ids.numel()
            if c.labels[p] != IGNORE_INDEX:  # would make the previous segment predict this token
                raise ValueError(f"candidate {len(reward_pos)}: token {p} (first of its own segment) is labelled; "
                                 "a packed segment must start on a prompt token")
            ids.append(c.input_ids[p:])
            labels.append(c.labels[p:])
            mm.append(c.mm_token_type_ids[p:])
            for pv, g in _image_slices(c)[n_img:]:
                images.add(pv, g)
            if c.image_grid_thw is not None:
                rope_grids.append(c.image_grid_thw)
            branches.append((gi, pos, n - p))
            index_rows.append(torch.cat([torch.arange(prefix_start, prefix_start + p),
                                         torch.arange(pos, pos + n - p)]))
            reward_pos.append(pos + c.reward_pos - p)
            pos += n - p
    T = pos
    L = max(r.numel() for r in index_rows)
    pack_index = torch.full((len(index_rows), L), -1, dtype=torch.long)
    for i, r in enumerate(index_rows):
        pack_index[i, :r.numel()] = r
    input_ids = torch.cat(ids).unsqueeze(0)
    return {
        "packed": True,
        "input_ids": input_ids,
        "labels": torch.cat(labels).unsqueeze(0),
        "attention_mask": torch.ones((1, T), dtype=torch.long),  # real tokens (counting only; no padding)
        "mm_token_type_ids": torch.cat(mm).to(torch.int32).unsqueeze(0),
        "reward_pos": torch.tensor(reward_pos, dtype=torch.long),
        "pixel_values": torch.cat(images.pixels) if images.pixels else None,
        "image_grid_thw": torch.stack(images.grids) if images.grids else None,
        "image_index": torch.tensor(images.slots, dtype=torch.long),
        "rope_image_grid_thw": torch.cat(rope_grids) if rope_grids else None,
        "pack_prefix": torch.tensor(prefix_spans, dtype=torch.long).reshape(-1, 2),
        "pack_branch": torch.tensor(branches, dtype=torch.long).reshape(-1, 3),
        "pack_index": pack_index,
        "pack_shared_tokens": shared_tokens,  # tokens the unpacked layout would repeat
    }


class PackedCollator:
    """``data.packing: group``: the drop-in replacement of ``collate.Collator`` (same pair tensors)."""

    def __init__(self, processor: RewardProcessor):
        self.merge = processor.merge
        self.dummy_pixel_values, self.dummy_image_grid_thw = dummy_vision_inputs(processor)

    def __call__(self, groups) -> dict[str, Any]:
        batch = pack([g.candidates for g in groups], self.merge)
        batch.update({"dummy_pixel_values": self.dummy_pixel_values, "dummy_image_grid_thw": self.dummy_image_grid_thw,
                      **group_pairs(groups)})
        return batch


def _prefix_key(c: Encoded) -> tuple:
    """Bucket key of a candidate's shared prefix (tokens + fingerprints of its prefix images); ``pack``
    checks real identity (``shared_prefix``) and shares nothing in a bucket that only collided."""
    p = c.prefix_len
    imgs = tuple(_fingerprint(pv, g) for pv, g in _image_slices(c)[:c.prefix_images])
    return (p, c.prefix_images, hashlib.blake2b(c.input_ids[:p].numpy().tobytes(), digest_size=16).digest(), imgs)


def shares_prefix(encoded: Sequence[Encoded]) -> bool:
    """Whether packing would share anything: two candidates with the same prefix bucket. Scoring packs
    only then, so a lone candidate is scored by the plain path (bit-equal to plain transformers)."""
    keys = [_prefix_key(c) for c in encoded]
    return len(set(keys)) < len(keys)


def pack_for_scoring(encoded: Sequence[Encoded], processor: RewardProcessor | None = None,
                     merge: int | None = None) -> dict[str, Any]:
    """Pack already-encoded candidates for ``JointRewardModel.score``: candidates whose prefix tokens
    and prefix images are identical (an item's K candidates) share one prefix. Anything after a
    candidate's reward token is dropped (scoring never reads it). ``mu[i]`` is ``encoded[i]``'s score."""
    if merge is None:
        merge = processor.merge if processor is not None else 2
    cut = [Encoded(c.input_ids[:c.reward_pos + 1], torch.full((c.reward_pos + 1,), IGNORE_INDEX, dtype=torch.long),
                   c.mm_token_type_ids[:c.reward_pos + 1], c.reward_pos, c.pixel_values, c.image_grid_thw,
                   c.prefix_len, c.prefix_images) for c in encoded]
    buckets: dict[tuple, list[int]] = {}
    for i, c in enumerate(cut):
        buckets.setdefault(_prefix_key(c), []).append(i)
    order = [i for idx in buckets.values() for i in idx]
    batch = pack([[cut[i] for i in idx] for idx in buckets.values()], merge)
    # reward_pos in input order, so mu[i] belongs to encoded[i]
    rp = torch.empty_like(batch["reward_pos"])
    rp[torch.tensor(order, dtype=torch.long)] = batch["reward_pos"]
    batch["reward_pos"] = rp
    if processor is not None:
        batch["dummy_pixel_values"], batch["dummy_image_grid_thw"] = dummy_vision_inputs(processor)
    batch["labels"] = None  # scoring: no LM targets
    return batch


def padding_stats(batch: dict[str, Any]) -> dict[str, float]:
    """Tokens processed and padding fraction of a collated batch (packed or not)."""
    total = batch["input_ids"].numel()
    real = int(batch["attention_mask"].sum())
    return {"tokens": float(total), "padding_fraction": 1.0 - real / max(total, 1)}
