"""Backbones: load a real VLM by name/path through transformers' auto classes, or build the tiny
offline Qwen2.5-VL used by tests and the demo.

The tiny backbone is the same architecture as Qwen2.5-VL-7B/72B at toy size, with random weights,
a byte-level BPE tokenizer trained here on a few sentences and a Qwen2-VL image processor. It is
written with ``save_pretrained`` so every later stage loads it by path exactly like a real
checkpoint: nothing else in the project knows it is tiny.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Qwen's special tokens (names as in the released tokenizers); the tiny tokenizer carries the same.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

# A Qwen2.5-VL-style chat template (system default, image placeholders, generation prompt).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.",
    "Judge how well the edited image follows the instruction and keeps the source image consistent.",
    "Instruction: make the square red. make the square green. make the square blue.",
    "make the square yellow. make the square purple. make the square orange. make the square white.",
    "The square is now red; the instruction asked for blue, so the edit does not follow it.",
    "The square is now green, exactly the colour the instruction asked for, so the edit follows it well.",
    "Overall the edit is good. Overall the edit is poor. The quality is high and the image is consistent.",
    "The object was removed, the background was changed, the style was transferred, the text was edited.",
    "0 1 2 3 4 5 6 7 8 9 . , ; : ! ? ' \" ( ) - score reward critique rationale image source candidate",
]


def build_tiny_tokenizer(vocab_size: int = 1024, extra_corpus: list[str] | None = None):
    """Train a byte-level BPE on a tiny corpus and wrap it as a PreTrainedTokenizerFast.
    ``extra_corpus`` (e.g. the pre-training captions) makes its words whole tokens too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((_CORPUS + list(extra_corpus or [])) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(tokenizer, hidden: int = 64, layers: int = 2, vision_hidden: int = 64, vocab_size: int | None = None):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = hidden // 4
    half = head_dim // 2  # mrope sections (t, h, w) sum to head_dim / 2
    sections = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text = dict(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": sections},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=2, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=4, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=hidden, window_size=56, fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def build_tiny_backbone(out_dir: str | os.PathLike, seed: int = 0, hidden: int = 64, layers: int = 2,
                        tokenizer: str = "tiny") -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint (model, tokenizer, image processor) to ``out_dir``.

    ``tokenizer="real"`` uses the real Qwen2.5-VL tokenizer (jrm_dist.tokenizer) and the released 152064
    embedding rows, so the special ids and ``<|reward|>`` (151665) are those of the 7B/72B checkpoints.

    Idempotent: an existing complete directory is left as is (same seed → same weights anyway).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if tokenizer not in ("tiny", "real"):
        raise ValueError(f"tokenizer={tokenizer!r}: expected 'tiny' or 'real'")
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists():
        cfg = json.loads((out / "config.json").read_text())
        if (cfg.get("text_config", cfg)["vocab_size"] > 150000) != (tokenizer == "real"):
            raise ValueError(f"{out}: holds a tiny backbone with another tokenizer than tokenizer={tokenizer!r}; "
                             "remove it or choose another --out")
        return out
    if tokenizer == "real":
        from jrm_dist.tokenizer import RELEASED_VOCAB_ROWS, build_qwen25_tokenizer

        tok, rows = build_qwen25_tokenizer(), RELEASED_VOCAB_ROWS
    else:
        tok, rows = build_tiny_tokenizer(), None
    cfg = tiny_config(tok, hidden=hidden, layers=layers, vocab_size=rows)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).float()
    processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tmp.rename(out)
    return out


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_image_processor(path: str):
    """The checkpoint's image processor; the PIL backend because torchvision is optional."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    except (TypeError, ValueError):
        return AutoImageProcessor.from_pretrained(path)


def load_backbone(name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "auto"):
    """Load any image-text-to-text model through transformers' auto classes (no hub access)."""
    from transformers import AutoModelForImageTextToText

    attn = resolve_attn_implementation(attn_implementation)
    return AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn)


def resolve_attn_implementation(choice: str) -> str:
    """flash-attn 2 when asked/available on a GPU, else SDPA (flash-attn is an optional [gpu] extra)."""
    if choice not in ("auto", "sdpa", "eager", "flash_attention_2"):
        raise ValueError(f"model.attn_implementation={choice!r}: expected auto, sdpa, eager or flash_attention_2")
    if choice in ("auto", "flash_attention_2"):
        try:
            import flash_attn  # noqa: F401

            if torch.cuda.is_available():
                return "flash_attention_2"
        except ImportError:
            pass
        if choice == "flash_attention_2":
            raise ValueError("model.attn_implementation=flash_attention_2 needs flash-attn and a CUDA GPU "
                             "(pip install '.[gpu]'); use sdpa or auto")
        return "sdpa"
    return choice
