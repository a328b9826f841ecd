"""Turn one candidate of a group into model inputs, with the sequence layout of docs/DESIGN.md:

    <user> [source image(s)] [candidate image(s)] instruction + judging prompt <|reward|> </user>
    <assistant> rationale ... <eos>

The reward token closes the user turn, so under causal attention its hidden state never sees the
rationale: training-time mu equals inference-time mu on the prompt alone. Labels are -100 everywhere
except the rationale tokens and the closing <eos>.

We do by hand what Qwen2_5_VLProcessor does (it cannot be constructed without torchvision): run the
image processor, expand each ``<|image_pad|>`` to ``grid_thw.prod() // merge**2`` tokens, tokenize.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from jrm_dist.backbones import load_image_processor, load_tokenizer

REWARD_TOKEN = "<|reward|>"
JRM_CONFIG = "jrm_config.json"  # a JRM checkpoint's head settings + the processor settings used in training
IGNORE_INDEX = -100
DEFAULT_PROMPT = (
    "You are judging an image edit. Instruction: {instruction}\n"
    "The first image is the source, the last one is the edited result. "
    "Rate how well the edit follows the instruction and keeps the rest consistent."
)


@dataclass
class Encoded:
    """One candidate sequence, ready for collate."""

    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long, IGNORE_INDEX outside the rationale
    mm_token_type_ids: torch.Tensor  # [T] int, 1 at image tokens
    reward_pos: int  # index of the reward token
    pixel_values: torch.Tensor | None  # [patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None  # [n_images, 3]
    # Shared-prefix boundary for group packing (jrm_dist.data.packing): the first ``prefix_len`` tokens
    # (chat header, source image(s), and for text candidates the instruction) hold nothing of the
    # candidate; they contain exactly the first ``prefix_images`` images. Always <= reward_pos.
    prefix_len: int = 0
    prefix_images: int = 0


def open_image(data: bytes | Image.Image, what: str = "image") -> Image.Image:
    """Decode image bytes to RGB; raises ValueError naming ``what`` on undecodable data."""
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im.convert("RGB")
    except Exception as e:  # PIL raises many types for bad data
        raise ValueError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from e


class RewardProcessor:
    """Tokenizer + image processor of a checkpoint, plus the reward-token layout."""

    def __init__(self, tokenizer, image_processor, prompt: str = DEFAULT_PROMPT,
                 max_pixels: int | None = None, min_pixels: int | None = None, max_length: int = 4096):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompt = prompt
        self.max_length = max_length
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        self.size = None
        if max_pixels or min_pixels:
            size = dict(getattr(image_processor, "size", None) or {})
            if max_pixels:
                size["longest_edge"] = int(max_pixels)
            if min_pixels:
                size["shortest_edge"] = int(min_pixels)
            self.size = size
        if REWARD_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]}, replace_extra_special_tokens=False)
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_token = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.merge = int(getattr(image_processor, "merge_size", 2))
        self.eos = tokenizer.eos_token or "<|im_end|>"

    @classmethod
    def from_pretrained(cls, path: str, **kw) -> "RewardProcessor":
        """Tokenizer + image processor of ``path``. A JRM checkpoint also records how training encoded
        its inputs (prompt, pixel budget, max length); those are reused so scoring encodes the same
        way. Explicit keyword arguments (not None) win."""
        opts = {}
        saved = Path(path) / JRM_CONFIG
        if saved.exists():
            opts = dict(json.loads(saved.read_text()).get("processor") or {})
        opts.update({k: v for k, v in kw.items() if v is not None})
        return cls(load_tokenizer(path), load_image_processor(path), **opts)

    def settings(self) -> dict:
        """What ``from_pretrained`` restores from a checkpoint's jrm_config.json."""
        return {"prompt": self.prompt, "max_pixels": self.max_pixels, "min_pixels": self.min_pixels,
                "max_length": self.max_length}

    def save_pretrained(self, path: str) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def _images(self, images: Sequence[Image.Image]):
        if not images:
            return None, None
        kw = {"size": self.size} if self.size else {}
        out = self.image_processor(images=list(images), return_tensors="pt", **kw)
        return out["pixel_values"], out["image_grid_thw"]

    def prompt_text(self, instruction: str, n_images: int, candidate_text: str | None = None) -> str:
        text = self.prompt.format(instruction=instruction)
        if candidate_text:
            text += f"\nResponse: {candidate_text}"
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text + REWARD_TOKEN}]
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, instruction: str, source_images: Sequence[Image.Image] = (),
               candidate_images: Sequence[Image.Image] = (), candidate_text: str | None = None,
               rationale: str | None = None) -> Encoded:
        """Encode one candidate; ``rationale=None`` gives the inference (prompt-only) sequence."""
        images = list(source_images) + list(candidate_images)
        pixel_values, grid = self._images(images)
        text = self.prompt_text(instruction, len(images), candidate_text)
        if grid is not None:  # expand each image placeholder to its number of merged patches
            parts = text.split(self.image_token)
            assert len(parts) == len(images) + 1, "chat template produced an unexpected number of image tokens"
            counts = (grid.prod(-1) // self.merge**2).tolist()
            text = parts[0] + "".join(self.image_token * n + p for n, p in zip(counts, parts[1:]))
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        target_ids: list[int] = []
        if rationale:
            target_ids = self.tokenizer(rationale + self.eos, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + target_ids
        if len(prompt_ids) > self.max_length:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens > data.max_length={self.max_length} "
                             "(lower data.max_pixels or raise max_length)")
        ids = ids[: self.max_length]  # only the rationale is truncated, never the prompt
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[len(prompt_ids):] = input_ids[len(prompt_ids):]
        reward_pos = [i for i, t in enumerate(prompt_ids) if t == self.reward_token_id]
        assert len(reward_pos) == 1, "exactly one reward token per sequence"
        mm = (input_ids == self.image_token_id).to(torch.int32)
        prefix_len, prefix_images = self._prefix(ids, reward_pos[0], len(source_images), bool(candidate_images),
                                                 instruction, len(images), grid)
        return Encoded(input_ids, labels, mm, reward_pos[0], pixel_values, grid, prefix_len, prefix_images)

    def _prefix(self, ids: list[int], reward_pos: int, n_source: int, has_cand_images: bool, instruction: str,
                n_images: int, grid) -> tuple[int, int]:
        """(prefix_len, prefix_images): where the candidate-specific tokens begin. With candidate images,
        at the first candidate image block (its <|vision_start|> excluded from the prefix); otherwise at
        the candidate text, found as the common token prefix with the prompt that has no candidate text
        (a BPE merge across the boundary only shortens it). The collator re-checks token identity."""
        runs, start = [], None  # [start, end) of each image-token block
        for i, t in enumerate(ids + [-1]):
            if t == self.image_token_id and start is None:
                start = i
            elif t != self.image_token_id and start is not None:
                runs.append((start, i))
                start = None
        if has_cand_images:
            p = runs[n_source][0]
            vs = self.tokenizer.convert_tokens_to_ids("<|vision_start|>")
            if p > 0 and ids[p - 1] == vs:
                p -= 1
        else:
            head = self.prompt_text(instruction, n_images, None).split(REWARD_TOKEN)[0]
            if grid is not None:
                parts = head.split(self.image_token)
                counts = (grid.prod(-1) // self.merge**2).tolist()
                head = parts[0] + "".join(self.image_token * n + q for n, q in zip(counts, parts[1:]))
            head_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"]
            p = 0
            while p < min(len(head_ids), len(ids)) and head_ids[p] == ids[p]:
                p += 1
        p = min(p, reward_pos)
        return p, sum(1 for a, b in runs if b <= p)


def dummy_vision_inputs(processor: RewardProcessor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values of one small blank image. The model runs the vision tower on it when a
    micro-batch has no image, so every ZeRO-3 rank joins the vision tower's collectives every step."""
    side = 28 * processor.merge // 2 * 2  # one merged patch window
    pv, grid = processor._images([Image.new("RGB", (side, side))])
    return pv, grid
