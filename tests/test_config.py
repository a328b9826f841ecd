from pathlib import Path

import pytest

from jrm_dist.config import ConfigError, JRMConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name: /models/x\nloss:\n  alpha: 0.2\n  rank_mode: bt_expected\n")
    cfg = load_config(p, ["loss.alpha=0.3", "train.max_steps=7", "optim.betas=[0.9, 0.95]", "model.lora.r=8"])
    assert isinstance(cfg, JRMConfig)
    assert cfg.model.name == "/models/x" and cfg.loss.rank_mode == "bt_expected"
    assert cfg.loss.alpha == 0.3 and cfg.train.max_steps == 7 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.model.lora.r == 8
    assert cfg.flat()["loss.alpha"] == 0.3


@pytest.mark.parametrize("override, message", [
    ("loss.alpah=0.3", "unknown config key 'loss.alpah'"),
    ("trian.max_steps=3", "unknown config key 'trian'"),
    ("loss.alpha=1.5", "loss.alpha=1.5: out of range"),
    ("train.max_steps=ten", "train.max_steps: expected an integer"),
    ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing: expected true/false"),
    ("loss.rank_mode=plackett", "loss.rank_mode='plackett': expected one of"),
    ("zero.stage=4", "zero.stage=4: expected one of"),
    ("zero.stage=0", "zero.stage=0: expected one of 1, 2, 3"),
    ("loss", "expected dotted.key=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  name: x\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: unknown config key 'model.bogus'"):
        load_config(wrong)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="offload_param needs zero.stage=3"):
        load_config(None, ["zero.stage=2", "zero.offload_param=cpu"])


def test_shipped_configs_load():
    """Every training config in configs/ validates (configs/repro/runs.yaml is a run list, checked in
    tests/test_report.py)."""
    files = sorted(f for f in (ROOT / "configs").rglob("*.yaml") if f.name != "runs.yaml")
    assert {"tiny.yaml", "qwen2_5_vl_7b.yaml", "qwen2_5_vl_72b.yaml"} <= {f.name for f in files}
    for f in files:
        load_config(f)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf", "-inf", "1e999"])
def test_every_float_key_rejects_non_finite_values(value):
    """One generic check covers every float field of every section (and float lists such as betas)."""
    import dataclasses

    floats = [k for k, v in JRMConfig().flat().items() if isinstance(v, float)]
    assert {"loss.alpha", "optim.lr", "loss.tie_margin", "train.grad_clip", "data.max_corrupt_fraction"} <= set(floats)
    for key in floats:
        with pytest.raises(ConfigError, match=rf"{key}=.*must be a finite number"):
            load_config(None, [f"{key}={value}"])
    with pytest.raises(ConfigError, match=r"optim.betas\[1\]=.*must be a finite number"):
        load_config(None, [f"optim.betas=[0.9, {value}]"])
    assert dataclasses.is_dataclass(load_config(None, ["loss.alpha=0.5"]))
