"""Engine construction without launching: DeepSpeed config generation, LR schedules, param groups,
freezing knobs, LoRA and its merge in the export, checkpoint discovery and RNG round trip."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from jrm_dist import checkpoint as ck
from jrm_dist.config import ConfigError, load_config
from jrm_dist.engine import build_model, deepspeed_config, lr_lambda, param_groups
from jrm_dist.export import _merge_lora, parse_size


def cfg_with(*ov, backbone="unused"):
    return load_config(None, [f"model.name={backbone}", *ov])


def test_deepspeed_config_stage3_offload_bf16():
    c = cfg_with("zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_param=nvme", "zero.nvme_path=/nvme",
                 "model.precision=bf16", "train.grad_accum=4", "data.groups_per_batch=2", "train.grad_clip=0.5")
    ds = deepspeed_config(c, world_size=8)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu"
    assert z["offload_param"] == {"device": "nvme", "pin_memory": False, "nvme_path": "/nvme",
                                  "buffer_count": c.zero.nvme_buffer_count, "buffer_size": c.zero.nvme_buffer_size}
    assert z["stage3_param_persistence_threshold"] == c.zero.stage3_param_persistence_threshold
    assert ds["train_batch_size"] == 2 * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert "checkpoint" not in ds and deepspeed_config(c, 8, load_universal=True)["checkpoint"]["load_universal"]


def test_nvme_offload_warns_once_about_buffers_held_for_reuse(caplog):
    import jrm_dist.engine as engine

    engine._WARNED.discard("nvme_reuse")
    nvme = ("zero.stage=3", "zero.offload_param=nvme", "zero.nvme_path=/nvme")
    with caplog.at_level("WARNING", logger="jrm_dist.engine"):
        deepspeed_config(cfg_with(*nvme, "zero.stage3_max_reuse_distance=0", "zero.stage3_prefetch_bucket_size=0"), 2)
        assert not caplog.records  # the settings the 7B rehearsal runs with
        deepspeed_config(cfg_with(*nvme), 2)
        deepspeed_config(cfg_with(*nvme), 2)
    assert len(caplog.records) == 1 and "Not enough buffers" in caplog.records[0].getMessage()


def test_deepspeed_config_stage2_has_no_stage3_knobs_and_stage0_is_refused():
    ds = deepspeed_config(cfg_with("zero.stage=2"), world_size=2)
    assert ds["zero_optimization"]["stage"] == 2
    assert not any(k.startswith("stage3_") for k in ds["zero_optimization"])
    with pytest.raises(ConfigError, match="zero.stage=0"):
        deepspeed_config(cfg_with("zero.stage=0"), world_size=2)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "wsd"])
def test_lr_schedules_warm_up_then_follow_their_shape(schedule):
    c = cfg_with(f"optim.schedule={schedule}", "train.max_steps=100", "optim.warmup_ratio=0.1",
                 "optim.decay_ratio=0.2", "optim.min_lr_ratio=0.1")
    f = lr_lambda(c)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear warmup over 10 steps
    if schedule == "constant":
        assert f(50) == f(99) == 1.0
    elif schedule == "cosine":
        assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    else:  # warmup - stable - decay over the last 20 steps
        assert f(79) == 1.0 and f(90) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def plain_model(tiny_backbone, tiny_processor):
    return build_model(cfg_with(backbone=tiny_backbone), tiny_processor.reward_token_id, None)


def test_param_groups_give_head_and_reward_token_the_head_lr(plain_model, tiny_backbone):
    c = cfg_with("optim.lr=1e-5", "optim.head_lr=1e-3", "optim.weight_decay=0.1", backbone=tiny_backbone)
    groups = {g["name"]: g for g in param_groups(plain_model, c)}
    head_ids = {id(p) for p in groups["head"]["params"]}
    assert {id(p) for p in plain_model.reward_head.parameters()} <= head_ids
    assert id(plain_model.reward_head.token.weight) in head_ids  # the reward-token embedding
    assert id(plain_model.backbone.get_input_embeddings().weight) not in head_ids  # the vocabulary: backbone LR
    assert groups["head"]["lr"] == 1e-3 and groups["backbone"]["lr"] == 1e-5
    assert groups["backbone"]["weight_decay"] == 0.1 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    n = sum(len(g["params"]) for g in groups.values())
    assert n == sum(1 for p in plain_model.parameters() if p.requires_grad)


def test_reward_token_lr_gives_the_reward_embedding_its_own_group(plain_model, tiny_backbone):
    """optim.reward_token_lr (issue 19): the <|reward|> embedding apart from the head (0 = frozen in place)."""
    c = cfg_with("optim.lr=1e-5", "optim.head_lr=1e-3", "optim.reward_token_lr=1e-5", backbone=tiny_backbone)
    groups = {g["name"]: g for g in param_groups(plain_model, c)}
    tok = plain_model.reward_head.token.weight
    assert [id(p) for p in groups["reward_token"]["params"]] == [id(tok)] and groups["reward_token"]["lr"] == 1e-5
    assert id(tok) not in {id(p) for p in groups["head"]["params"]} and groups["head"]["lr"] == 1e-3
    assert sum(len(g["params"]) for g in groups.values()) == sum(1 for p in plain_model.parameters() if p.requires_grad)
    assert "reward_token" not in {g["name"] for g in param_groups(plain_model, cfg_with(backbone=tiny_backbone))}
    with pytest.raises(ConfigError, match="optim.reward_token_lr"):
        cfg_with("optim.reward_token_lr=-1", backbone=tiny_backbone)


def test_head_only_steps_hold_the_backbone_lr_at_zero_then_follow_the_schedule():
    """optim.head_only_steps (issue 19): fit the head on the pretrained features first, then fine-tune all."""
    from jrm_dist.engine import group_lr_lambdas

    c = cfg_with("optim.schedule=cosine", "train.max_steps=100", "optim.warmup_ratio=0.1", "optim.head_only_steps=20")
    groups = [{"name": "backbone"}, {"name": "backbone_no_decay"}, {"name": "head"}, {"name": "reward_token"}]
    bb, bb_nd, head, tok = group_lr_lambdas(c, groups)
    base = lr_lambda(c)
    assert bb(0) == bb(19) == bb_nd(19) == 0.0 and bb(20) == base(20) and bb_nd(60) == base(60)
    assert head(0) == base(0) and head(19) == base(19) and tok(5) == base(5)
    plain = cfg_with("optim.schedule=cosine", "train.max_steps=100", "optim.warmup_ratio=0.1")
    assert all(f(s) == base(s) for f in group_lr_lambdas(plain, groups) for s in (0, 19, 50))  # default: no hold
    with pytest.raises(ConfigError, match="optim.head_only_steps"):
        cfg_with("optim.head_only_steps=-1")


def test_freezing_knobs(tiny_backbone, tiny_processor):
    c = cfg_with("model.freeze_vision=true", "model.freeze_merger=true", backbone=tiny_backbone)
    m = build_model(c, tiny_processor.reward_token_id, None)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and all(".visual." in f".{n}" for n in frozen)
    assert any(".merger." in n for n in frozen)
    assert all(p.requires_grad for n, p in m.named_parameters() if ".language_model." in n or "reward_head" in n)


def test_lora_merge_matches_peft(tiny_backbone, tiny_processor):
    """Our export-time merge (base + alpha/r * B @ A on the state dict) equals peft's merge_and_unload."""
    c = cfg_with("model.lora.r=4", "model.lora.alpha=8", backbone=tiny_backbone)
    m = build_model(c, tiny_processor.reward_token_id, None)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and not any("q_proj.base_layer" in n for n in trainable)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
    sd = {k[len("backbone."):]: v.clone() for k, v in m.state_dict().items() if k.startswith("backbone.")}
    merged = {k: (v.contiguous() if hasattr(v, "contiguous") else v) for k, v in _merge_lora(sd, 8 / 4).items()}
    from peft.tuners.lora import LoraLayer

    for mod in m.backbone.modules():
        if isinstance(mod, LoraLayer):
            mod.merge()
    name = next(k for k in merged if k.endswith("self_attn.q_proj.weight"))
    mod = m.backbone.get_submodule(name.rsplit(".", 1)[0])
    torch.testing.assert_close(merged[name], mod.base_layer.weight, rtol=1e-5, atol=1e-6)
    assert not any("lora_" in k or "base_layer" in k for k in merged)


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("200KB") == 200_000 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max-shard-size"):
        parse_size("five")


def test_rng_state_round_trips_through_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    st = json.loads(json.dumps(ck.rng_state()))
    a = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ck.set_rng_state(st)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == a


def test_find_resume_skips_incomplete_checkpoints(tmp_path):
    root = ck.ckpt_root(tmp_path)
    for step, complete in ((2, True), (4, True), (6, False)):
        d = root / ck.step_dir_name(step)
        (d / ck.DS_TAG).mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
        if complete:
            (d / ck.COMPLETE).write_text("")
    (root / ck.LATEST).write_text("step_00000006")  # points at an incomplete one (e.g. copied by hand)
    assert ck.find_resume(tmp_path, "auto") == root / "step_00000004"
    assert ck.find_resume(tmp_path, "none") is None
    assert ck.find_resume(tmp_path, str(root / "step_00000002")) == root / "step_00000002"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ck.find_resume(tmp_path, str(root / "step_00000006"))
    assert ck.find_resume(tmp_path / "empty", "auto") is None
