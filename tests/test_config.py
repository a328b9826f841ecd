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


# ---------------------------------------------------------------- every key declares its valid values (issue 18 §1)

def _leaf_settings():
    from jrm_dist.config import walk_settings

    return list(walk_settings())


def _numeric(tp) -> bool:
    import typing

    inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
    return inner in (int, float)


def test_every_key_declares_its_valid_values():
    """Enumerated from the dataclasses: a key added without a declaration (or a number without a lower
    bound, a string without choices or text=True) fails here."""
    settings = _leaf_settings()
    assert len(settings) > 60 and "optim.min_lr_ratio" in {k for k, _, _ in settings}
    for name, tp, spec in settings:
        assert spec is not None, f"{name}: no setting(...) declaration"
        if _numeric(tp):
            assert spec["ge"] is not None or spec["gt"] is not None or spec["choices"], f"{name}: no lower bound"
        elif tp is str or tp == list[str]:
            assert spec["choices"] or spec["text"], f"{name}: neither choices nor text=True"


@pytest.mark.parametrize("name, tp, spec", _leaf_settings(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_key_refuses_out_of_range_nan_and_wrong_type(name, tp, spec):
    """Walks every key: NaN, a wrong type, and values just outside its declared range or choices each exit
    with a ConfigError naming the key."""
    import re

    named = re.escape(name)
    bad = [".nan", "{a: 1}"]  # NaN, and a mapping where a leaf is expected
    if tp is bool:
        bad.append("maybe")
    elif tp in (int, float):
        bad.append("ten")
    items = typing_list(tp)
    if _numeric(tp):
        lo = spec["ge"] - max(1, abs(spec["ge"])) if spec["ge"] is not None else spec["gt"]
        if lo is not None:
            bad.append(lo)
        hi = spec["le"] + max(1, abs(spec["le"])) if spec["le"] is not None else spec["lt"]
        if hi is not None:
            bad.append(hi)
    if spec["choices"]:
        bad.append(9 if _numeric(tp) else "no-such-choice")
    if spec["nonempty"]:
        bad.append("''")
    if items and spec["length"] and spec["length"][0]:
        bad.append("[]")
    for value in bad:
        shown = f"[{value}, {value}]" if items and not str(value).startswith(("[", "{")) and value != ".nan" else value
        with pytest.raises(ConfigError, match=named):
            load_config(None, [f"{name}={shown}"])


def typing_list(tp) -> bool:
    import typing

    return typing.get_origin(tp) is list


@pytest.mark.parametrize("override, message", [
    # accepted silently before (run exited 0)
    ("optim.min_lr_ratio=-3", r"optim.min_lr_ratio=-3.0: out of range \[0.0, 1.0\]"),
    ("optim.min_lr_ratio=50", r"optim.min_lr_ratio=50.0: out of range"),
    ("loss.z_loss=-1", r"loss.z_loss=-1.0: out of range"),
    ("train.grad_clip=-1", r"train.grad_clip=-1.0: out of range \[0.0, inf\]"),
    ("data.shuffle_buffer=-1", r"data.shuffle_buffer=-1: out of range"),
    ("train.save_every=-10", r"train.save_every=-10: out of range"),
    ("train.epochs=0", r"train.epochs=0: out of range \[1, inf\]"),
    # failed ~15 s later with a torch traceback naming no key
    ("optim.weight_decay=-5", r"optim.weight_decay=-5.0: out of range"),
    ("optim.eps=-1", r"optim.eps=-1.0: out of range \(0.0, 1.0\]"),
    ("optim.eps=0", r"optim.eps=0.0: out of range \(0.0, 1.0\]"),
    ("optim.betas=[1.5,-2]", r"optim.betas\[0\]=1.5: out of range \[0.0, 1.0\)"),
    ("optim.betas=[0.9]", r"optim.betas: expected 2 item\(s\), got 1"),
    ("data.max_pixels=-5", r"data.max_pixels=-5: out of range \[784, 12845056\]"),
    ("optim.lr=3e38", r"optim.lr=3e\+38: out of range"),
    # grew to 10 GiB of RSS before
    ("data.min_pixels=100000000", r"data.min_pixels=100000000: out of range"),
    ("data.min_pixels=50176", r"data.min_pixels=50176 > data.max_pixels=12544"),
])
def test_issue_18_values_fail_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_jrm_train_exits_2_on_a_bad_value_before_starting(capsys):
    """In-process: main() refuses before init_distributed or any model work (seconds, not ~15 s)."""
    import time

    from jrm_dist.train import main

    t0 = time.perf_counter()
    assert main(["--config", str(ROOT / "configs" / "tiny.yaml"), "optim.eps=0"]) == 2
    assert "optim.eps=0.0: out of range" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("module", ["train", "preflight", "plan"])
def test_overrides_are_accepted_anywhere_on_the_command_line(module, capsys):
    """`jrm-train --config C a=1 --resume X b=2` read b=2 as an unrecognized argument (issue 18 §4): every
    command that takes dotted overrides reads them before, between and after its options."""
    import importlib

    main = importlib.import_module(f"jrm_dist.{module}").main
    opt = {"train": ["--resume", "none"], "preflight": ["--resume", "none"], "plan": ["--json"]}[module]
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "train.max_steps=3", *opt, "optim.eps=0"]
    assert main(argv) == 2  # the override after the option was read (and refused by name), not argparse's exit
    assert "optim.eps=0.0: out of range" in capsys.readouterr().err
