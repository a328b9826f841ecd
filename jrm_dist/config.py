"""One typed config for every stage: dataclasses loaded from YAML, with dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=20", "loss.alpha=0.3"])

Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class LoraConfig:
    r: int = 0  # 0 = LoRA off
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    name: str = "runs/tiny-backbone"  # HF path or name of the VLM backbone (loaded by auto classes)
    reward_token: str = "<|reward|>"
    head_hidden: int = 1024  # reward-head MLP width
    # none | standardize: the head's input is (h - mean) / std per dimension, with the statistics of the
    # reward-token states at the first training step (fixed buffers, saved with the head). The reward-token
    # states of a pretrained backbone share one large vector (same template, same token): the differences
    # between candidates are a few % of their norm, and a head on the raw states barely learns (docs/jrm_effect.md).
    head_input_norm: str = "none"
    precision: str = "fp32"  # fp32 | bf16 (DeepSpeed bf16 mixed precision when bf16)
    attn_implementation: str = "auto"  # auto (flash-attn 2 if installed on GPU, else sdpa) | sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = False
    freeze_vision: bool = False
    freeze_merger: bool = False
    freeze_lm: bool = False
    lm_ce: str = "auto"  # auto (fused kernels) | reference (torch masked_lm_loss)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    train_shards: str = ""  # manifest.json, a directory holding one, or a brace pattern / URL list
    eval_shards: str = ""
    rank_by: str = "overall"  # score dimension used when a group has no explicit ranking
    prompt: str = ""  # judging prompt template with {instruction}; "" = the built-in default
    max_pixels: int = 112 * 112
    min_pixels: int = 28 * 28
    max_length: int = 2048
    use_rationale: bool = True
    num_workers: int = 0
    shuffle_buffer: int = 64
    groups_per_batch: int = 2  # groups per micro-batch (all candidates of a group stay together)
    packing: str = "none"  # none (one padded row per candidate) | group (one packed row: shared prefix once, no padding)
    seed: int = 0
    max_corrupt_fraction: float = 0.01  # abort when more than this fraction of an epoch's records are unusable
    verify: bool = False  # check every shard's sha256 against manifest.json before training (and in preflight)


@dataclass
class LossConfig:
    rank_mode: str = "thurstone"  # thurstone | bt_expected | bt
    ties: str = "model"  # model | ignore
    tie_margin: float = 0.5
    alpha: float = 0.3  # L = (1 - alpha) L_rank + alpha L_LM
    alpha_schedule: str = "constant"  # constant | linear | cosine
    alpha_start: float = 0.0
    alpha_ramp_steps: int = 0
    z_loss: float = 0.0
    label_smoothing: float = 0.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | cpu_adam | adamw8bit | paged_adamw8bit
    lr: float = 2e-6
    head_lr: float = 1e-4  # reward head and reward-token embedding
    # The <|reward|> input embedding alone (None = head_lr, 0 = frozen). At a head's LR an embedding row moves
    # by its own size within a few dozen steps, and with it the shared part of every reward-token state.
    reward_token_lr: float | None = None
    # The first N steps train the head only (backbone LR 0), then everything: a random head's gradients would
    # distort the pretrained reward-token features first (linear probing, then fine-tuning).
    head_only_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "constant"  # constant | cosine | wsd (all with linear warmup)
    warmup_ratio: float = 0.05
    decay_ratio: float = 0.1  # wsd: fraction of steps in the final decay
    min_lr_ratio: float = 0.0


@dataclass
class ZeroConfig:
    stage: int = 3
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"  # none | cpu | nvme (stage 3 only)
    nvme_path: str = "/local_nvme"
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/jrm"
    max_steps: int = 100
    epochs: int = 1
    grad_accum: int = 1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    max_consecutive_skips: int = 20  # stop with an error after this many skipped (non-finite) steps in a row
    step_log: bool = True  # append per-step losses + every rank's group keys to <output_dir>/steps.jsonl (audit, resume checks)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI or sqlite:///<output_dir>/mlflow.db
    experiment: str = "jrm"
    run_name: str = ""


@dataclass
class JRMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key → value (for MLflow params)."""
        out: dict[str, Any] = {}

        def walk(d, prefix):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    out[f"{prefix}{k}"] = v
        walk(self.to_dict(), "")
        return out


_CHOICES = {
    "model.precision": ("fp32", "bf16"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "model.lm_ce": ("auto", "reference"),
    "model.head_input_norm": ("none", "standardize"),
    "data.packing": ("none", "group"),
    "loss.rank_mode": ("thurstone", "bt_expected", "bt"),
    "loss.ties": ("model", "ignore"),
    "loss.alpha_schedule": ("constant", "linear", "cosine"),
    "optim.name": ("adamw", "cpu_adam", "adamw8bit", "paged_adamw8bit"),
    "optim.schedule": ("constant", "cosine", "wsd"),
    "zero.stage": (1, 2, 3),  # jrm-train relies on a ZeRO optimizer to skip non-finite steps on all ranks
    "zero.offload_optimizer": ("none", "cpu", "nvme"),
    "zero.offload_param": ("none", "cpu", "nvme"),
}
_RANGES = {  # inclusive
    "loss.alpha": (0.0, 1.0), "loss.alpha_start": (0.0, 1.0), "loss.tie_margin": (0.0, None),
    "optim.lr": (0.0, None), "optim.head_lr": (0.0, None), "optim.warmup_ratio": (0.0, 1.0),
    "optim.decay_ratio": (0.0, 1.0), "train.max_steps": (1, None), "train.grad_accum": (1, None),
    "train.keep_last": (1, None), "data.groups_per_batch": (1, None), "data.max_length": (16, None),
    "loss.label_smoothing": (0.0, 1.0), "model.head_hidden": (1, None),
    "train.max_consecutive_skips": (1, None), "optim.head_only_steps": (0, None), "data.max_corrupt_fraction": (0.0, 1.0),
}


def _coerce(key: str, tp, value):
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, args[0], value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' (valid keys under "
                              f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], key + ".")
        else:
            kwargs[f.name] = _coerce(key, tp, data[f.name])
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    out: dict = {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected dotted.key=value")
        k, v = ov.split("=", 1)
        try:
            val = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            val = v
        _set_dotted(out, k.strip(), val)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_finite(flat: dict[str, Any]) -> None:
    """Every float field (and float list item) of every section: NaN/Inf pass range checks silently
    (``nan < 0`` is False), so they are refused here, once, for all keys."""
    for key, v in flat.items():
        for i, x in enumerate(v if isinstance(v, list) else [v]):
            if isinstance(x, float) and not math.isfinite(x):
                name = f"{key}[{i}]" if isinstance(v, list) else key
                raise ConfigError(f"{name}={x!r}: must be a finite number (NaN and Inf are not allowed)")


def validate(cfg: JRMConfig) -> JRMConfig:
    flat = cfg.flat()
    _check_finite(flat)
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}={flat[key]!r}: expected one of {', '.join(map(str, choices))}")
    for key, (lo, hi) in _RANGES.items():
        v = flat[key]
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{key}={v!r}: out of range [{lo}, {'inf' if hi is None else hi}]")
    if cfg.zero.offload_param != "none" and cfg.zero.stage != 3:
        raise ConfigError("zero.offload_param needs zero.stage=3")
    if cfg.optim.reward_token_lr is not None and cfg.optim.reward_token_lr < 0:
        raise ConfigError(f"optim.reward_token_lr={cfg.optim.reward_token_lr!r}: must be >= 0 (or null = optim.head_lr)")
    if cfg.loss.ties == "model" and cfg.loss.tie_margin <= 0:
        raise ConfigError("loss.tie_margin must be > 0 when loss.ties=model")
    if cfg.data.packing == "group" and cfg.model.attn_implementation in ("eager", "flash_attention_2"):
        raise ConfigError(f"data.packing=group needs model.attn_implementation=sdpa (or auto resolving to sdpa), "
                          f"not {cfg.model.attn_implementation}: packed rows run their own tree attention")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JRMConfig:
    data: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
    data = _merge(data, parse_overrides(overrides or []))
    try:
        cfg = _build(JRMConfig, data, "")
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path or '<overrides>'}: {e}") from None


def config_from_dict(data: dict) -> JRMConfig:
    return validate(_build(JRMConfig, data, ""))
