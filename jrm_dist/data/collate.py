"""Group → candidate sequences → one micro-batch (the last two steps of the loader pipeline).

All K candidates of a group go into the same micro-batch, so one forward pass scores them all;
the group's ranking becomes (win, lose, tie) index tensors over the batch's candidate rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from jrm_dist.data.schema import group_ranking
from jrm_dist.losses import ranking_to_pairs
from jrm_dist.processing import IGNORE_INDEX, Encoded, RewardProcessor, dummy_vision_inputs, open_image


@dataclass
class EncodedGroup:
    key: str
    candidates: list[Encoded]
    win: list[int]
    lose: list[int]
    tie: list[bool]


def encode_group(processor: RewardProcessor, rec: Mapping[str, Any], images: Mapping[str, Any],
                 rank_by: str = "overall", use_rationale: bool = True) -> EncodedGroup:
    """Encode every candidate of a schema record; ``images`` maps field name → bytes or PIL image.

    LM supervision: a candidate's own rationale, else the group rationale, else none.
    """
    key = rec["key"]
    src = [open_image(images[n], f"group {key} field {n}") for n in rec.get("source_images") or []]
    encoded = []
    for k, cand in enumerate(rec["candidates"]):
        cimgs = [open_image(images[n], f"group {key} field {n}") for n in cand.get("images") or []]
        rationale = (cand.get("rationale") or rec.get("rationale")) if use_rationale else None
        encoded.append(processor.encode(rec["instruction"], src, cimgs, cand.get("text"), rationale))
    win, lose, tie = ranking_to_pairs(group_ranking(rec, rank_by))
    return EncodedGroup(key, encoded, win, lose, tie)


def group_pairs(groups: list[EncodedGroup]) -> dict[str, Any]:
    """Pair index tensors over the batch's candidate rows (candidates in group order), the row → group
    map and the keys: what every collator (padded or packed) adds for the rank loss."""
    win, lose, tie, gidx = [], [], [], []
    offset = 0
    for gi, g in enumerate(groups):
        win += [offset + w for w in g.win]
        lose += [offset + l for l in g.lose]
        tie += g.tie
        gidx += [gi] * len(g.candidates)
        offset += len(g.candidates)
    return {"win_idx": torch.tensor(win, dtype=torch.long), "lose_idx": torch.tensor(lose, dtype=torch.long),
            "tie": torch.tensor(tie, dtype=torch.bool), "group_index": torch.tensor(gidx, dtype=torch.long),
            "keys": [g.key for g in groups]}


class Collator:
    """Pads candidate sequences (right padding) and builds pair index tensors."""

    def __init__(self, processor: RewardProcessor):
        self.pad_id = processor.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = processor.tokenizer.eos_token_id
        self.dummy_pixel_values, self.dummy_image_grid_thw = dummy_vision_inputs(processor)

    def __call__(self, groups: list[EncodedGroup]) -> dict[str, Any]:
        cands = [c for g in groups for c in g.candidates]
        T = max(c.input_ids.numel() for c in cands)
        B = len(cands)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        mm = torch.zeros((B, T), dtype=torch.int32)
        for i, c in enumerate(cands):
            n = c.input_ids.numel()
            input_ids[i, :n] = c.input_ids
            labels[i, :n] = c.labels
            attention_mask[i, :n] = 1
            mm[i, :n] = c.mm_token_type_ids
        pv = [c.pixel_values for c in cands if c.pixel_values is not None]
        grid = [c.image_grid_thw for c in cands if c.image_grid_thw is not None]
        return {
            "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "mm_token_type_ids": mm,
            "reward_pos": torch.tensor([c.reward_pos for c in cands], dtype=torch.long),
            "pixel_values": torch.cat(pv) if pv else None,
            "image_grid_thw": torch.cat(grid) if grid else None,
            "dummy_pixel_values": self.dummy_pixel_values, "dummy_image_grid_thw": self.dummy_image_grid_thw,
            **group_pairs(groups),
        }
