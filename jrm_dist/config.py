"""One typed config for every stage: dataclasses loaded from YAML, with dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=20", "loss.alpha=0.3"])

Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the dotted key. Every field
declares its valid values next to its default (``setting(...)``: bounds, choices, length, free text), and
``validate`` walks every field of every section from those declarations, so a new key cannot go unchecked.
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


MISSING = dataclasses.MISSING
SPEC = "valid"  # the dataclass field metadata entry that declares a key's valid values


def setting(default=MISSING, *, factory=MISSING, ge=None, gt=None, le=None, lt=None, choices=None, length=None,
        nonempty: bool = False, text: bool = False):
    """A config field with its valid values declared next to its default (the one place ranges live).

    Numbers (and the items of number lists) take bounds ``ge``/``gt`` (a lower bound is required) and
    ``le``/``lt``; strings take ``choices`` or ``text=True`` (free text, ``nonempty`` to refuse "");
    lists take ``length=(min, max)``. Booleans need no bounds."""
    spec = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None,
            "length": length, "nonempty": nonempty, "text": text}
    return field(default=default, default_factory=factory, metadata={SPEC: spec})


PIXELS = dict(ge=28 * 28, le=28 * 28 * 16384)  # one merged 28x28 image token .. Qwen2.5-VL's own max_pixels
SEED = dict(ge=0, le=2**32 - 1)


@dataclass
class LoraConfig:
    r: int = setting(0, ge=0, le=4096)  # 0 = LoRA off
    alpha: int = setting(16, ge=1, le=1 << 16)
    dropout: float = setting(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = setting(factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], text=True,
                                    nonempty=True, length=(1, None))


@dataclass
class ModelConfig:
    # HF path or name of the VLM backbone (loaded by auto classes)
    name: str = setting("runs/tiny-backbone", text=True, nonempty=True)
    reward_token: str = setting("<|reward|>", text=True, nonempty=True)
    head_hidden: int = setting(1024, ge=1, le=1 << 16)  # reward-head MLP width
    precision: str = setting("fp32", choices=("fp32", "bf16"))  # fp32 | bf16 (DeepSpeed bf16 mixed precision when bf16)
    # auto (flash-attn 2 if installed on GPU, else sdpa) | sdpa | eager | flash_attention_2
    attn_implementation: str = setting("auto", choices=("auto", "sdpa", "eager", "flash_attention_2"))
    gradient_checkpointing: bool = setting(False)
    freeze_vision: bool = setting(False)
    freeze_merger: bool = setting(False)
    freeze_lm: bool = setting(False)
    # auto (fused kernels) | reference (torch masked_lm_loss)
    lm_ce: str = setting("auto", choices=("auto", "reference"))
    # none | standardize: the head's input is (h - mean) / std per dimension, with the statistics of the
    # reward-token states at the first training step (fixed buffers, saved with the head). The reward-token
    # states of a pretrained backbone share one large vector (same template, same token): the differences
    # between candidates are a few % of their norm, and a head on the raw states barely learns (docs/jrm_effect.md).
    head_input_norm: str = setting("none", choices=("none", "standardize"))
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    train_shards: str = setting("", text=True)  # manifest.json, a directory holding one, or a brace pattern / URL list
    eval_shards: str = setting("", text=True)
    # score dimension used when a group has no explicit ranking
    rank_by: str = setting("overall", text=True, nonempty=True)
    prompt: str = setting("", text=True)  # judging prompt template with {instruction}; "" = the built-in default
    max_pixels: int = setting(112 * 112, **PIXELS)
    min_pixels: int = setting(28 * 28, **PIXELS)  # <= max_pixels; every image is resized to at least this many pixels
    max_length: int = setting(2048, ge=16, le=1 << 20)
    use_rationale: bool = setting(True)
    num_workers: int = setting(0, ge=0, le=256)
    shuffle_buffer: int = setting(64, ge=0)  # 0 or 1 = no shuffling within a shard
    # groups per micro-batch (all candidates of a group stay together)
    groups_per_batch: int = setting(2, ge=1, le=1 << 16)
    # none (one padded row per candidate) | group (one packed row: shared prefix once, no padding)
    packing: str = setting("none", choices=("none", "group"))
    seed: int = setting(0, **SEED)
    # abort when more than this fraction of an epoch's records are unusable
    max_corrupt_fraction: float = setting(0.01, ge=0.0, le=1.0)
    verify: bool = setting(False)  # check every shard's sha256 against manifest.json before training (and in preflight)


@dataclass
class LossConfig:
    rank_mode: str = setting("thurstone", choices=("thurstone", "bt_expected", "bt"))
    ties: str = setting("model", choices=("model", "ignore"))
    tie_margin: float = setting(0.5, ge=0.0, le=100.0)
    alpha: float = setting(0.3, ge=0.0, le=1.0)  # L = (1 - alpha) L_rank + alpha L_LM
    alpha_schedule: str = setting("constant", choices=("constant", "linear", "cosine"))
    alpha_start: float = setting(0.0, ge=0.0, le=1.0)
    alpha_ramp_steps: int = setting(0, ge=0)
    z_loss: float = setting(0.0, ge=0.0, le=1.0)
    label_smoothing: float = setting(0.0, ge=0.0, lt=1.0)


@dataclass
class OptimConfig:
    name: str = setting("adamw", choices=("adamw", "cpu_adam", "adamw8bit", "paged_adamw8bit"))
    # Above ~3e37 Adam's bias-corrected step size overflows float32 (3e38 crashed at step 1); a large but
    # representable LR is left to the divergence guard (train.divergence_factor) and the skip limit.
    lr: float = setting(2e-6, ge=0.0, le=1e30)
    head_lr: float = setting(1e-4, ge=0.0, le=1e30)  # reward head and reward-token embedding
    # The <|reward|> input embedding alone (None = head_lr, 0 = frozen). At a head's LR an embedding row moves
    # by its own size within a few dozen steps, and with it the shared part of every reward-token state.
    reward_token_lr: float | None = setting(None, ge=0.0, le=1e30)
    # The first N steps train the head only (backbone LR 0), then everything: a random head's gradients would
    # distort the pretrained reward-token features first (linear probing, then fine-tuning).
    head_only_steps: int = setting(0, ge=0)
    weight_decay: float = setting(0.0, ge=0.0, le=10.0)
    betas: list[float] = setting(factory=lambda: [0.9, 0.999], ge=0.0, lt=1.0, length=(2, 2))
    eps: float = setting(1e-8, gt=0.0, le=1.0)  # 0 divides 0 by 0 for a parameter whose gradient is 0
    schedule: str = setting("constant", choices=("constant", "cosine", "wsd"))  # all with linear warmup
    warmup_ratio: float = setting(0.05, ge=0.0, le=1.0)
    decay_ratio: float = setting(0.1, ge=0.0, le=1.0)  # wsd: fraction of steps in the final decay
    min_lr_ratio: float = setting(0.0, ge=0.0, le=1.0)  # cosine / wsd end at min_lr_ratio * lr


@dataclass
class ZeroConfig:
    # jrm-train relies on a ZeRO optimizer to skip non-finite steps on all ranks
    stage: int = setting(3, ge=1, le=3, choices=(1, 2, 3))
    offload_optimizer: str = setting("none", choices=("none", "cpu", "nvme"))
    offload_param: str = setting("none", choices=("none", "cpu", "nvme"))  # stage 3 only
    nvme_path: str = setting("/local_nvme", text=True, nonempty=True)
    # ZeRO-Infinity parameter swap buffers (offload_param=nvme): each holds one parameter *partition*, so
    # nvme_buffer_size (elements) must be >= the largest one (7B: 152064 x 3584 / world size)
    nvme_buffer_count: int = setting(5, ge=1)
    nvme_buffer_size: int = setting(100_000_000, ge=1)
    overlap_comm: bool = setting(True)
    contiguous_gradients: bool = setting(True)
    reduce_bucket_size: int = setting(50_000_000, ge=1)
    stage3_prefetch_bucket_size: int = setting(50_000_000, ge=0)
    stage3_param_persistence_threshold: int = setting(100_000, ge=0)
    stage3_max_live_parameters: int = setting(1_000_000_000, ge=1)
    stage3_max_reuse_distance: int = setting(1_000_000_000, ge=0)
    stage3_gather_16bit_weights_on_model_save: bool = setting(False)


@dataclass
class TrainConfig:
    output_dir: str = setting("runs/jrm", text=True, nonempty=True)
    max_steps: int = setting(100, ge=1)
    epochs: int = setting(1, ge=1)
    grad_accum: int = setting(1, ge=1)
    grad_clip: float = setting(1.0, ge=0.0)  # 0 = no clipping
    seed: int = setting(0, **SEED)
    log_every: int = setting(1, ge=1)
    eval_every: int = setting(0, ge=0)  # 0 = only at the end
    save_every: int = setting(0, ge=0)  # 0 = only at the end
    keep_last: int = setting(2, ge=1)
    # stop with an error after this many skipped (non-finite) steps in a row
    max_consecutive_skips: int = setting(20, ge=1)
    # Divergence guard: a save whose global weight norm exceeds this multiple of the norm the run started
    # from (initial or resumed weights) stops the run instead (finite but blown-up weights are not "good").
    divergence_factor: float = setting(100.0, gt=1.0)
    # append per-step losses + every rank's group keys to <output_dir>/steps.jsonl (audit, resume checks)
    step_log: bool = setting(True)
    # consolidate the final checkpoint into <output_dir>/export when the run ends (false: run jrm-export later,
    # e.g. on another machine; a 72B export is a job of its own)
    export: bool = setting(True)


@dataclass
class TrackingConfig:
    enabled: bool = setting(True)
    uri: str = setting("", text=True)  # "" = $MLFLOW_TRACKING_URI or sqlite:///<output_dir>/mlflow.db
    experiment: str = setting("jrm", text=True, nonempty=True)
    run_name: str = setting("", text=True)


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
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
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


def _check_value(name: str, x: Any, spec: dict) -> None:
    """One scalar (a field, or one item of a list field) against its declaration."""
    if isinstance(x, float) and not math.isfinite(x):  # NaN passes every comparison below silently
        raise ConfigError(f"{name}={x!r}: must be a finite number (NaN and Inf are not allowed)")
    if spec["choices"] is not None and x not in spec["choices"]:
        raise ConfigError(f"{name}={x!r}: expected one of {', '.join(map(str, spec['choices']))}")
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        lo = spec["ge"] if spec["ge"] is not None else spec["gt"]
        hi = spec["le"] if spec["le"] is not None else spec["lt"]
        if (spec["ge"] is not None and x < spec["ge"]) or (spec["gt"] is not None and x <= spec["gt"]) or \
                (spec["le"] is not None and x > spec["le"]) or (spec["lt"] is not None and x >= spec["lt"]):
            raise ConfigError(f"{name}={x!r}: out of range {'[' if spec['gt'] is None else '('}{lo}, "
                              f"{'inf' if hi is None else hi}{']' if spec['lt'] is None else ')'}")
    if isinstance(x, str) and spec["nonempty"] and not x.strip():
        raise ConfigError(f"{name}: must not be empty")


_UNDECLARED = setting().metadata[SPEC]


def walk_settings(cls=None, prefix: str = ""):
    """(dotted key, annotated type, declaration) of every leaf field of the config, sections recursed."""
    cls = cls or JRMConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from walk_settings(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, hints[f.name], f.metadata.get(SPEC)


def validate(cfg: JRMConfig) -> JRMConfig:
    flat = cfg.flat()
    for name, _, spec in walk_settings():
        # A key without a declaration still gets its type and finiteness checked here; the declaration
        # itself is enforced by tests/test_config.py (test_every_key_declares_its_valid_values).
        spec = spec or _UNDECLARED
        v = flat[name]
        if isinstance(v, list):
            lo, hi = spec["length"] or (None, None)
            if (lo is not None and len(v) < lo) or (hi is not None and len(v) > hi):
                want = lo if lo == hi else f"{lo or 0} to {'any number of' if hi is None else hi}"
                raise ConfigError(f"{name}: expected {want} item(s), got {len(v)}")
            for i, x in enumerate(v):
                _check_value(f"{name}[{i}]", x, spec)
        else:
            _check_value(name, v, spec)
    if cfg.data.min_pixels > cfg.data.max_pixels:
        raise ConfigError(f"data.min_pixels={cfg.data.min_pixels} > data.max_pixels={cfg.data.max_pixels}: every "
                          f"image would be resized up past the budget")
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
