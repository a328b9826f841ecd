"""jrm-plan: exact parameter counts, the ZeRO accounting, the CLI, the shipped/launcher configs, and the
planner checked against DeepSpeed's estimator, measured activations and a measured 2-rank ZeRO-3 run."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from jrm_dist import plan as P
from jrm_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "jrm_dist" / "model_configs"


def _validate_module():
    spec = importlib.util.spec_from_file_location("validate_plan", ROOT / "bench" / "validate_plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _arch(name: str) -> P.Arch:
    return P.load_arch(f"Qwen/Qwen2.5-VL-{name}-Instruct")


def _cfg(*overrides: str, base: str = "configs/qwen2_5_vl_7b.yaml"):
    return load_config(ROOT / base, list(overrides))


@pytest.mark.parametrize("name", ["7b", "72b"])
def test_parameter_inventory_equals_the_hf_model(name):
    """Counted tensor by tensor from config.json == the transformers model built from the same file."""
    raw = json.loads((SHIPPED / f"qwen2_5_vl_{name}.json").read_text())
    arch = P.read_arch(raw, name)
    inv = P.inventory(arch, head_hidden=1024)
    total, largest = P.hf_meta_counts(raw)
    assert P.param_count(inv) - P.param_count(inv, {"head"}) == total
    assert P.largest_module(inv) == largest
    # the published sizes: 8.29 B and 73.4 B
    assert abs(total / 1e9 - {"7b": 8.29, "72b": 73.4}[name]) < 0.01


def test_tiny_backbone_inventory(tiny_backbone):
    from transformers import AutoModelForImageTextToText

    arch = P.load_arch(tiny_backbone)  # model.name as a local directory
    m = AutoModelForImageTextToText.from_pretrained(tiny_backbone)
    inv = P.inventory(arch, head_hidden=64)
    assert P.param_count(inv) - P.param_count(inv, {"head"}) == sum(p.numel() for p in m.parameters())


def test_shipped_configs_hold_the_released_architecture():
    a7, a72 = _arch("7B"), _arch("72B")
    assert (a7.hidden, a7.intermediate, a7.layers, a7.heads, a7.kv_heads) == (3584, 18944, 28, 28, 4)
    assert (a72.hidden, a72.intermediate, a72.layers, a72.heads, a72.kv_heads) == (8192, 29568, 80, 64, 8)
    for a in (a7, a72):
        assert a.vocab == 152064 and not a.tie_embeddings
        assert (a.v_depth, a.v_hidden, a.v_intermediate, a.v_heads, a.patch, a.merge) == (32, 1280, 3420, 16, 14, 2)
        assert a.out_hidden == a.hidden


def test_model_states_follow_the_zero_paper():
    """bf16 + Adam: 2Ψ params + 2Ψ grads + 12Ψ optimizer, divided by N per the stage."""
    a = _arch("7B")
    inv = P.inventory(a, 1024)
    psi = P.param_count(inv)
    n = 8

    def states(*ov):
        cfg = _cfg("zero.stage3_param_persistence_threshold=0", *ov)
        ms = P.model_states(cfg, inv, a, n)
        return ms["params"], ms["grads"], ms["optimizer"]

    assert states("zero.stage=3") == pytest.approx((2 * psi / n, 2 * psi / n, 12 * psi / n))
    assert states("zero.stage=2") == pytest.approx((2 * psi, 2 * psi / n, 12 * psi / n))
    assert states("zero.stage=1") == pytest.approx((2 * psi, 2 * psi, 12 * psi / n))
    assert states("zero.stage=3", "zero.offload_optimizer=cpu") == pytest.approx((2 * psi / n, 0, 0))
    assert states("zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_param=cpu") == (0, 0, 0)
    p8, g8, o8 = states("zero.stage=3", "optim.name=adamw8bit")
    assert o8 == pytest.approx((4 + 2 + 8 / 256) * psi / n)
    # frozen vision tower: no grads / optimizer states for it, its params still partitioned
    vis = P.param_count(inv, {"vision"})
    _, g, o = states("zero.stage=3", "model.freeze_vision=true")
    assert g == pytest.approx(2 * (psi - vis) / n) and o == pytest.approx(12 * (psi - vis) / n)
    # persistent (small) tensors stay whole on every rank under stage 3
    cfg = _cfg("zero.stage=3", "zero.stage3_param_persistence_threshold=100000")
    small = sum(t.numel * t.count for t in inv if t.numel < 100000)
    assert P.model_states(cfg, inv, a, n)["params"] == pytest.approx(2 * psi / n + 2 * small)


def test_activation_and_loss_buffer_rules():
    a = _arch("7B")
    w = P.Workload(groups=4, candidates=2, seq_len=2048, images_per_seq=2, image_tokens=256, labelled=256)
    full = P.activations(_cfg("model.gradient_checkpointing=false"), a, w, 2)
    ck = P.activations(_cfg("model.gradient_checkpointing=true"), a, w, 2)
    assert ck["text"] < full["text"] / 5 and ck["vision"] < full["vision"] / 5
    frozen = P.activations(_cfg("model.freeze_vision=true", "model.freeze_merger=true"), a, w, 2)
    assert frozen["vision"] == 0
    # 7B bf16 flash-attn layer: 20h + 4 d_kv + 8I bytes/token + lse (module docstring)
    assert P.text_layer_act(a, 2) == 20 * 3584 + 4 * 512 + 8 * 18944 + 4 * 28
    cfg = _cfg()
    fused, full_ce = P.loss_buffer(cfg, a, w, 2, "fused"), P.loss_buffer(cfg, a, w, 2, "full")
    assert full_ce == (2 + 8) * 8 * 2048 * 152064  # N·V·(bf16 logits + fp32 log-probs + fp32 grad)
    assert full_ce > 10 * fused  # fused: 4 MiB tiles + the fp32 dW accumulator (4·V·h), no N·V term
    assert P.loss_buffer(_cfg("loss.alpha=0"), a, w, 2, "fused") == 0  # rank-only: no LM loss


def test_fused_ce_tile_is_the_kernels_tile():
    from jrm_kernels._ce_torch import DEFAULT_BLOCK_ELEMS

    assert P.FUSED_CE_BLOCK_ELEMS == DEFAULT_BLOCK_ELEMS


@pytest.mark.parametrize("config,nodes", [("configs/qwen2_5_vl_7b.yaml", 1), ("configs/qwen2_5_vl_72b.yaml", 4)])
def test_cli_json_and_max_micro_batch(config, nodes, capsys):
    assert P.main(["--config", str(ROOT / config), "--nodes", str(nodes), "--gpus-per-node", "8", "--gpu", "h200",
                   "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("model_states_gib", "activations_gib", "loss_buffer_gib", "total_gib", "max_micro_batch", "params_b"):
        assert isinstance(out[k], (int, float)), k
    assert out["fits"] and out["total_gib"] <= out["usable_gib"]
    parts = out["model_states_gib"] + out["zero_buffers_gib"] + out["activations_gib"] + out["loss_buffer_gib"]
    assert out["total_gib"] == pytest.approx(parts + out["reserved_gib"])
    assert out["max_micro_batch"] >= out["micro_batch"]
    # the largest micro-batch fits and one more does not
    def total(mb):
        P.main(["--config", str(ROOT / config), "--nodes", str(nodes), "--gpu", "h200", "--micro-batch", str(mb),
                "--json"])
        return json.loads(capsys.readouterr().out)
    assert total(out["max_micro_batch"])["fits"] and not total(out["max_micro_batch"] + 1)["fits"]
    assert 0 < out["mfu"] < 1 and out["step_s"] > 0


def test_cli_text_output(capsys):
    assert P.main(["--config", str(ROOT / "configs/qwen2_5_vl_72b.yaml"), "--nodes", "4", "--gpu", "h200"]) == 0
    text = capsys.readouterr().out
    for word in ("model states", "activations text", "LM-loss buffer", "total (peak)", "max micro-batch", "MFU"):
        assert word in text


def test_errors_name_the_file_and_field(tmp_path, capsys):
    with pytest.raises(P.PlanError, match="model.name='nowhere/x'"):
        P.load_arch("nowhere/x")
    raw = json.loads((SHIPPED / "qwen2_5_vl_7b.json").read_text())
    del raw["num_key_value_heads"], raw["num_attention_heads"]
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(P.PlanError, match=r"config.json: missing field num_attention_heads"):
        P.load_arch("unused", str(bad))
    raw = json.loads((SHIPPED / "qwen2_5_vl_7b.json").read_text())
    raw["vision_config"]["depth"] = "32"
    bad.write_text(json.dumps(raw))
    with pytest.raises(P.PlanError, match=r"vision_config.depth='32'"):
        P.load_arch("unused", str(bad))
    assert P.main(["--config", str(ROOT / "configs/qwen2_5_vl_7b.yaml"), "model.name=nowhere/x"]) == 2
    assert "model.name='nowhere/x'" in capsys.readouterr().err


def _launcher_defaults(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^DEFAULT_([A-Z_]+)=(\S+)", path.read_text(), flags=re.M))


@pytest.mark.parametrize("model", ["7b", "72b"])
def test_launcher_defaults_fit_according_to_the_planner(model, capsys):
    launcher = ROOT / "launchers" / f"train_{model}.sh"
    if not launcher.exists():
        pytest.skip(f"{launcher} not written yet")
    d = _launcher_defaults(launcher)  # headers vs DEFAULT_* vs config: tests/test_launchers.py
    config = ROOT / "configs" / f"qwen2_5_vl_{model}.yaml"
    assert P.main(["--config", str(config), "--nodes", d["NODES"], "--gpus-per-node", d["GPUS_PER_NODE"],
                   "--gpu", d["GPU"], "--micro-batch", d["MICRO_BATCH"], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"], f"{launcher.name}: micro-batch {d['MICRO_BATCH']} needs {out['total_gib']:.1f} GiB"
    assert int(d["MICRO_BATCH"]) <= out["max_micro_batch"]


def test_shipped_training_configs_load():
    for path in [ROOT / "configs/qwen2_5_vl_7b.yaml", ROOT / "configs/qwen2_5_vl_72b.yaml"]:
        cfg = load_config(path)
        assert cfg.model.precision == "bf16" and cfg.model.gradient_checkpointing
        assert cfg.optim.lr == 2e-6 and cfg.optim.schedule == "constant" and cfg.optim.warmup_ratio == 0.05
        assert cfg.model.name in P.SHIPPED_CONFIGS


# ------------------------------------------------------------------ the planner against measurements (tiny model)
def test_planner_agrees_with_deepspeed_estimator_and_measured_activations(tmp_path):
    v = _validate_module()
    rows = v.deepspeed_estimator(tmp_path, quick=True) + v.activations(tmp_path, quick=True)
    assert {r["name"].split("/")[1] for r in rows} == {"deepspeed_estimator", "activations"}
    bad = [(r["name"], round(r["ratio"], 3)) for r in rows if not r["ok"]]
    assert not bad


@pytest.mark.launch
def test_planner_agrees_with_a_measured_zero3_run(tmp_path):
    """2 CPU ranks, our trainer, one step: each rank's parameter/gradient/optimizer tensors vs the plan."""
    v = _validate_module()
    rows = v.measured_zero3(tmp_path, quick=True, full=False)
    assert len(rows) == 2
    bad = [(r["name"], round(r["ratio"], 3)) for r in rows if not r["ok"]]
    assert not bad


def test_lora_adapter_count_matches_peft(tiny_backbone):
    """peft matches module names anywhere: gate/up/down_proj also hit the vision blocks."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    arch = P.load_arch(tiny_backbone)
    for targets in (["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "gate_proj", "down_proj"]):
        m = AutoModelForImageTextToText.from_pretrained(tiny_backbone)
        peft_model = get_peft_model(m, LoraConfig(r=4, target_modules=targets))
        adapters = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        assert P.lora_params(arch, 4, targets) == adapters


def test_lora_trainable_count_equals_the_built_models(tiny_backbone):
    """Under LoRA the engine trains the adapters and the reward head (its token row included), nothing of the
    vocabulary matrices: the plan counted the 152k-row input embedding as trainable (0.55 B at 7B)."""
    from jrm_dist.config import load_config
    from jrm_dist.engine import build_model

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"model.name={tiny_backbone}", "model.lora.r=4"])
    model = build_model(cfg, reward_token_id=5)
    built = sum(p.numel() for p in model.parameters() if p.requires_grad)
    arch = P.load_arch(tiny_backbone)
    ms = P.model_states(cfg, P.inventory(arch, cfg.model.head_hidden), arch, n=1)
    assert ms["trainable_params"] == built
