"""JointRewardModel on the tiny Qwen2.5-VL: score == training mu, LM loss, save/load, vision dummy."""
import pickle

import pytest
import torch
import torch.nn.functional as F

from data_prep.synthetic import make_group
from jrm_dist.data.collate import Collator, encode_group
from jrm_dist.model import JointRewardModel


@pytest.fixture(scope="module")
def model(tiny_backbone, tiny_processor):
    torch.manual_seed(0)
    m = JointRewardModel.from_backbone(tiny_backbone, tiny_processor.reward_token_id, head_hidden=32,
                                       attn_implementation="sdpa", lm_ce="reference")
    return m.eval()


def _batch(proc, rationale=True, k=3, n=2, seed=0):
    groups = [encode_group(proc, *make_group(seed, i, k=k), use_rationale=rationale) for i in range(n)]
    return Collator(proc)(groups)


def test_score_equals_training_mu(model, tiny_processor):
    """Causal attention: the rationale after the reward token cannot change mu."""
    train_batch = _batch(tiny_processor, rationale=True)
    assert (train_batch["labels"] != -100).any()
    out = model(train_batch)
    mu_score, sigma = model.score(train_batch)
    torch.testing.assert_close(mu_score, out["mu"].detach(), rtol=0, atol=1e-5)
    prompt_only = _batch(tiny_processor, rationale=False)
    assert prompt_only["input_ids"].shape[1] < train_batch["input_ids"].shape[1]
    mu_prompt, _ = model.score(prompt_only)
    torch.testing.assert_close(mu_prompt, out["mu"].detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sigma, torch.exp(0.5 * out["log_var"].detach()), rtol=1e-5, atol=1e-6)


def test_mu_depends_on_the_candidate_image(model, tiny_processor):
    b = _batch(tiny_processor, rationale=False, k=3, n=1)
    mu, _ = model.score(b)
    assert mu.unique().numel() == 3


def test_lm_loss_is_ce_on_rationale_positions_only(model, tiny_processor):
    b = _batch(tiny_processor, rationale=True)
    out = model(b)
    with torch.no_grad():
        logits = model.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                mm_token_type_ids=b["mm_token_type_ids"], pixel_values=b["pixel_values"],
                                image_grid_thw=b["image_grid_thw"]).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), b["labels"][:, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum")
    torch.testing.assert_close(out["lm_loss_sum"].detach(), ref, rtol=1e-4, atol=1e-3)
    assert int(out["lm_tokens"]) == int((b["labels"][:, 1:] != -100).sum())


def test_reward_token_added_and_initialised(model, tiny_processor):
    emb = model.backbone.get_input_embeddings().weight
    rid = tiny_processor.reward_token_id
    assert emb.shape[0] > rid
    torch.testing.assert_close(emb[rid], emb[:rid].mean(0), rtol=1e-5, atol=1e-6)
    # the trainable reward-token embedding (head LR) starts from that row and is what the model reads
    torch.testing.assert_close(model.reward_head.token.weight, emb[rid], rtol=0, atol=0)
    b = _batch(tiny_processor, rationale=False, n=1)
    mu0, _ = model.score(b)
    with torch.no_grad():
        model.reward_head.token.weight.add_(1.0)
    try:
        assert not torch.allclose(model.score(b)[0], mu0)
    finally:
        with torch.no_grad():
            model.reward_head.token.weight.sub_(1.0)


def test_gradients_reach_both_heads_and_vision(model, tiny_processor):
    model.train()
    try:
        b = _batch(tiny_processor, rationale=True, n=1)
        out = model(b)
        (out["mu"].sum() + out["log_var"].sum() + out["lm_loss_sum"]).backward()
        assert model.reward_head.fc.weight.grad.abs().sum() > 0
        assert model.backbone.get_output_embeddings().weight.grad.abs().sum() > 0
        vis = [p for n, p in model.backbone.named_parameters() if "visual" in n]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vis)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_text_only_batch_still_runs_vision_tower(model, tiny_processor):
    """No image in the micro-batch → the vision tower still runs (on a blank dummy) so ZeRO-3 stays in step."""
    rec, images = make_group(0, 0, k=2)
    rec = dict(rec, source_images=[], candidates=[dict(c, images=[], text=f"answer {i}")
                                                  for i, c in enumerate(rec["candidates"])])
    b = Collator(tiny_processor)([encode_group(tiny_processor, rec, {})])
    assert b["pixel_values"] is None
    model.train()
    try:
        out = model(b)
        out["mu"].sum().backward()
        vis = [p for n, p in model.backbone.named_parameters() if "visual" in n]
        assert all(p.grad is not None for p in vis if p.requires_grad)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_save_load_roundtrip_without_pickle(model, tiny_processor, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path / "ckpt", processor=tiny_processor)
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"jrm_config.json", "reward_head.safetensors", "config.json", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)

    def no_pickle(*a, **k):
        raise AssertionError("loading must not unpickle")
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = JointRewardModel.from_pretrained(tmp_path / "ckpt", attn_implementation="sdpa").eval()
    monkeypatch.undo()
    b = _batch(tiny_processor, rationale=False)
    torch.testing.assert_close(loaded.score(b)[0], model.score(b)[0], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not a JRM checkpoint"):
        JointRewardModel.from_pretrained(tmp_path)


def test_checkpoint_restores_the_training_encoding(model, tiny_backbone, tmp_path):
    """A JRM checkpoint records how training encoded inputs; scoring reloads the same prompt/pixel budget."""
    from jrm_dist.processing import RewardProcessor

    trained = RewardProcessor.from_pretrained(tiny_backbone, prompt="Rate this edit: {instruction}",
                                              max_pixels=28 * 28 * 4, max_length=300)
    model.save_pretrained(tmp_path / "ckpt", processor=trained)
    again = RewardProcessor.from_pretrained(str(tmp_path / "ckpt"))
    assert again.settings() == trained.settings()
    assert again.prompt == "Rate this edit: {instruction}" and again.size["longest_edge"] == 28 * 28 * 4
    assert RewardProcessor.from_pretrained(str(tmp_path / "ckpt"), max_pixels=12544).max_pixels == 12544
    rec, images = make_group(0, 1, k=2)
    a = encode_group(trained, rec, images, use_rationale=False).candidates[0]
    b = encode_group(again, rec, images, use_rationale=False).candidates[0]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
