"""jrm-explain: the checkpoint's LM head writes the critique right after the scoring prompt. A model
taught one rationale must reproduce it greedily from a saved checkpoint through the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from jrm_dist import explain as ex
from jrm_dist.eval.common import Scorer

RATIONALE = "The square is now red, as the instruction asked, so the edit follows it."


def pic(rgb, size=(56, 42)):
    im = Image.new("RGB", size, (225, 225, 225))
    im.paste(rgb, (10, 10, 40, 30))
    return im


@pytest.fixture(scope="module")
def taught_checkpoint(jrm_checkpoint, tmp_path_factory):
    """The tiny JRM model with its LM head fitted to one (prompt, rationale) sequence: the backbone is
    frozen, so the hidden states under teacher forcing are computed once and only the head is trained
    (seconds on a CPU); greedy decoding then sees exactly those hidden states."""
    from jrm_dist.data.collate import Collator, EncodedGroup
    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import IGNORE_INDEX, RewardProcessor

    proc = RewardProcessor.from_pretrained(jrm_checkpoint)
    model = JointRewardModel.from_pretrained(jrm_checkpoint)
    enc = proc.encode("make the square red", [pic((128, 128, 128))], [pic((220, 30, 30))], rationale=RATIONALE)
    batch = Collator(proc)([EncodedGroup("g", [enc], [], [], [])])
    with torch.no_grad():
        hidden = model._hidden(batch, batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"])
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    h, y = hidden[:, :-1][keep], labels[keep]
    head = model.backbone.get_output_embeddings()
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(500):
        loss = torch.nn.functional.cross_entropy(head(h), y)  # plain logits: the fused kernel is for training
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    assert loss.item() < 0.01, f"could not fit the rationale (loss {loss.item():.3f})"
    out_dir = tmp_path_factory.mktemp("taught") / "ckpt"
    model.save_pretrained(out_dir, proc)
    return str(out_dir)


def test_cli_reproduces_the_taught_rationale(taught_checkpoint, tmp_path):
    pic((128, 128, 128)).save(tmp_path / "src.png")
    pic((220, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "items.jsonl").write_text(
        json.dumps({"id": "a", "instruction": "make the square red", "source_images": ["src.png"],
                    "image": "red.png"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert ex.main(["--model", taught_checkpoint, "--input", str(tmp_path / "items.jsonl"), "--out", str(out),
                    "--max-new-tokens", "40", "--device", "cpu"]) == 0
    rec = json.loads(out.read_text())
    assert rec["id"] == "a" and rec["critique"] == RATIONALE
    scorer = Scorer(taught_checkpoint, device="cpu")
    mu = scorer.score_encoded([scorer.encode("make the square red", [pic((128, 128, 128))], [pic((220, 30, 30))])])[0].mu
    assert rec["mu"] == pytest.approx(mu, abs=1e-5) and rec["sigma"] > 0


def test_generation_starts_after_the_reward_prompt_and_batches_like_singles(jrm_checkpoint):
    scorer = Scorer(jrm_checkpoint, device="cpu")
    items = [{"instruction": "make the square red", "source_images": [pic((128, 128, 128))],
              "images": [pic((220, 30, 30))]},
             {"instruction": "make the square blue and keep the background", "source_images": [pic((128, 128, 128))],
              "images": [pic((30, 60, 220), (80, 80))]},
             {"instruction": "a", "images": [pic((30, 170, 40), (30, 30))]}]
    batched = ex.explain(scorer, items, max_new_tokens=8)
    singles = [ex.explain(scorer, [it], max_new_tokens=8)[0] for it in items]
    assert [b["critique"] for b in batched] == [s["critique"] for s in singles]
    # the first generated token is the LM head's argmax right after "<|reward|><|im_end|>\n<|im_start|>assistant\n"
    tok = scorer.processor.tokenizer
    enc = scorer.encode(items[0]["instruction"], items[0]["source_images"], items[0]["images"])
    assert tok.decode(enc.input_ids[enc.reward_pos:]) == "<|reward|><|im_end|>\n<|im_start|>assistant\n"
    with torch.inference_mode():
        logits = scorer.model.backbone(input_ids=enc.input_ids[None], attention_mask=torch.ones_like(enc.input_ids)[None],
                                       mm_token_type_ids=enc.mm_token_type_ids[None], pixel_values=enc.pixel_values,
                                       image_grid_thw=enc.image_grid_thw).logits
    first = int(logits[0, -1].argmax())
    ids = ex.left_pad([enc], tok.pad_token_id)
    gen = scorer.model.backbone.generate(**ids, max_new_tokens=1, do_sample=False, temperature=None, top_p=None,
                                         top_k=None, pad_token_id=tok.pad_token_id)
    assert int(gen[0, -1]) == first


def test_sampling_is_seeded(jrm_checkpoint):
    scorer = Scorer(jrm_checkpoint, device="cpu")
    item = [{"instruction": "make the square red", "images": [pic((220, 30, 30))]}]
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(ex.explain(scorer, item, max_new_tokens=16, do_sample=True, temperature=1.5, top_p=1.0)[0]["critique"])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_input_errors_name_the_line(tmp_path, capsys, jrm_checkpoint):
    (tmp_path / "items.jsonl").write_text('{"instruction": "x", "image": "a.png"}\n{"instruction": 3}\n')
    assert ex.main(["--model", jrm_checkpoint, "--input", str(tmp_path / "items.jsonl")]) == 2
    assert "items.jsonl line 1 field 'images'" in capsys.readouterr().err
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    assert ex.main(["--model", jrm_checkpoint, "--input", str(tmp_path / "items.jsonl")]) == 2
    assert "items.jsonl line 2: field 'instruction' must be a string" in capsys.readouterr().err
