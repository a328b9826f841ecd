"""DeepSpeed engine construction from the one JRM config.

* ``deepspeed_config(cfg)``  — the ZeRO / precision / clipping / accumulation dict DeepSpeed reads;
* ``build_model(cfg, ...)``  — backbone under ``HfDeepSpeedConfig`` (ZeRO-3: parameters are partitioned
  while loading, a 72B model is never whole on one rank), reward token + head, freezing, LoRA, grad
  checkpointing;
* ``param_groups`` / ``build_optimizer`` / ``lr_lambda`` — optimizer choice and the LR schedule;
* ``initialize(cfg, ...)``  — all of the above handed to ``deepspeed.initialize``.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from jrm_dist.config import ConfigError, JRMConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- distributed setup

def init_distributed(skip_shm_comm: bool | None = None) -> None:
    """``deepspeed.init_distributed`` with env:// rendezvous (torchrun / SLURM / our tests).

    On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op (~34 s cold) that only its
    *inference* all-reduce uses; training collectives go through gloo. We mark it unavailable unless
    ``JRM_SHM_COMM=1`` so a CPU launch does not pay the compile."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if skip_shm_comm is None:
        skip_shm_comm = get_accelerator().device_name() == "cpu" and os.environ.get("JRM_SHM_COMM", "0") != "1"
    if skip_shm_comm:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False)
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, int(os.environ.get("LOCAL_RANK", "0")))


# ----------------------------------------------------------------------------- DeepSpeed config

def _offload(kind: str, nvme_path: str) -> dict[str, Any] | None:
    if kind == "none":
        return None
    d: dict[str, Any] = {"device": kind, "pin_memory": torch.cuda.is_available()}
    if kind == "nvme":
        d["nvme_path"] = nvme_path
    return d


_WARNED: set[str] = set()


def _warn_nvme_reuse(cfg: JRMConfig) -> None:
    """Parameters on disk pass through ``zero.nvme_buffer_count`` buffers. Gathered parameters that will be
    reused soon (gradient checkpointing recomputes every layer) or prefetched keep theirs, and at 7B the
    backward pass ran out ("Not enough buffers 0 for swapping 1", after minutes of loading): say so at start."""
    z = cfg.zero
    if "nvme_reuse" in _WARNED or (z.stage3_max_reuse_distance == 0 and z.stage3_prefetch_bucket_size == 0):
        return
    _WARNED.add("nvme_reuse")
    log.warning("zero.offload_param=nvme with zero.stage3_max_reuse_distance=%d and zero.stage3_prefetch_bucket_size"
                "=%d: gathered parameters kept for reuse or prefetched hold swap buffers, and a step can run out of "
                "them (DeepSpeed: 'Not enough buffers 0 for swapping'); the 7B rehearsal trains with both at 0 "
                "(docs/real_size.md)", z.stage3_max_reuse_distance, z.stage3_prefetch_bucket_size)


def deepspeed_config(cfg: JRMConfig, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config. One micro-batch = ``data.groups_per_batch`` groups per rank."""
    z = cfg.zero
    zero: dict[str, Any] = {
        "stage": z.stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_bucket_size": z.reduce_bucket_size,
    }
    off = _offload(z.offload_optimizer, z.nvme_path)
    if off:
        zero["offload_optimizer"] = off
    if z.stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": z.stage3_prefetch_bucket_size,
            "stage3_param_persistence_threshold": z.stage3_param_persistence_threshold,
            "stage3_max_live_parameters": z.stage3_max_live_parameters,
            "stage3_max_reuse_distance": z.stage3_max_reuse_distance,
            "stage3_gather_16bit_weights_on_model_save": z.stage3_gather_16bit_weights_on_model_save,
        })
        off = _offload(z.offload_param, z.nvme_path)
        if off and z.offload_param == "nvme":
            off.update(buffer_count=z.nvme_buffer_count, buffer_size=z.nvme_buffer_size)
            _warn_nvme_reuse(cfg)
        if off:
            zero["offload_param"] = off
    mbs = cfg.data.groups_per_batch
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": mbs * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # client optimizers (torch AdamW, bitsandbytes 8-bit)
        "bf16": {"enabled": cfg.model.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


# ----------------------------------------------------------------------------- model

def _dtype(cfg: JRMConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.model.precision == "bf16" else torch.float32


def _freeze(model, cfg: JRMConfig) -> None:
    """Freezing knobs. Names follow transformers' Qwen2.5-VL layout (``model.visual``, ``visual.merger``,
    ``model.language_model``, ``lm_head``); a knob that matches nothing is an error, not a no-op."""
    bb = model.backbone
    rules = []
    if cfg.model.freeze_vision:
        rules.append(("model.freeze_vision", lambda n: ".visual." in f".{n}" and ".merger." not in f".{n}"))
    if cfg.model.freeze_merger:
        rules.append(("model.freeze_merger", lambda n: ".merger." in f".{n}"))
    if cfg.model.freeze_lm:
        rules.append(("model.freeze_lm", lambda n: ".language_model." in f".{n}" or n.startswith("lm_head.")))
    for knob, match in rules:
        hit = 0
        for n, p in bb.named_parameters():
            if match(n):
                p.requires_grad_(False)
                hit += 1
        if not hit:
            raise ConfigError(f"{knob}=true matched no backbone parameter (unknown layout {type(bb).__name__})")


def _freeze_lm_head_if_rank_only(model, cfg: JRMConfig) -> None:
    """alpha = 0 for the whole run: the LM head is never called, so it gets no gradient and, with
    requires_grad off, no optimizer state. Only when it is not tied to the input embeddings: a tied
    matrix is also the input embedding, which the rank loss trains."""
    from jrm_dist.objective import rank_only

    if not rank_only(cfg.loss):
        return
    bb = model.backbone
    out_emb, in_emb = bb.get_output_embeddings(), bb.get_input_embeddings()
    if out_emb is None or out_emb.weight is in_emb.weight:
        return
    for p in out_emb.parameters():
        p.requires_grad_(False)


def _apply_lora(model, cfg: JRMConfig) -> None:
    """LoRA adapters on the backbone's matching Linear layers (peft); the base weights are frozen; the
    reward head (with the reward-token embedding) stays trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lc = cfg.model.lora
    pcfg = PeftLoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                          bias="none")
    lm_head = model.backbone.get_output_embeddings()
    model.backbone = get_peft_model(model.backbone, pcfg).base_model.model  # LoraModel injects in place
    assert model.backbone.get_output_embeddings() is lm_head


def _match_zero3_dtype(model, dtype: torch.dtype) -> None:
    """Parameters added after ``zero.Init`` (peft's LoRA adapters, which it keeps in fp32 over a bf16 base) in
    the model's dtype: ZeRO-3 flattens all trainable partitions into one buffer of one dtype (its ``defragment``
    asserts it) and keeps the fp32 master copies itself, so nothing is lost in the optimizer step."""
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def build_model(cfg: JRMConfig, reward_token_id: int, ds_config: dict | None = None):
    """The JointRewardModel; under ZeRO-3 built inside ``HfDeepSpeedConfig`` so transformers loads the
    weights straight into partitions (``zero.Init``) and the new head is initialised in
    ``GatheredParameters`` (model.py). The head is seeded from ``train.seed`` right before it is made,
    so a single-process reference built with ``ds_config=None`` starts from the same weights."""
    from jrm_dist.backbones import load_backbone
    from jrm_dist.model import JointRewardModel, add_reward_token

    keep = None
    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # must stay referenced while the model is built
    else:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    if keep is not None and os.path.isdir(cfg.model.name):
        from jrm_dist.backbones import resolve_attn_implementation
        from jrm_dist.partitioned_load import check_nvme_buffers, load_backbone_partitioned

        off = ds_config["zero_optimization"].get("offload_param") or {}
        if off.get("device") == "nvme":
            check_nvme_buffers(cfg.model.name, torch.distributed.get_world_size(), int(off["buffer_size"]))
        backbone = load_backbone_partitioned(cfg.model.name, _dtype(cfg),
                                             resolve_attn_implementation(cfg.model.attn_implementation))
    else:
        backbone = load_backbone(cfg.model.name, dtype=_dtype(cfg), attn_implementation=cfg.model.attn_implementation)
    add_reward_token(backbone, reward_token_id)
    torch.manual_seed(cfg.train.seed)
    if keep is not None:
        import deepspeed

        # With parameters offloaded to NVMe every zero.Init makes its own swapper, but DeepSpeed swaps a
        # module's parameters in through the first one's: the head shares the backbone's (else "Number of
        # elements in param N is unknown" at the head's first gather).
        swapper = next((p.nvme_swapper for p in backbone.parameters() if getattr(p, "nvme_swapper", None)), None)
        with deepspeed.zero.Init(config_dict_or_path=ds_config, param_swapper=swapper):
            model = JointRewardModel(backbone, reward_token_id, cfg.model.head_hidden, lm_ce=cfg.model.lm_ce,
                                     head_input_norm=cfg.model.head_input_norm)
    else:
        model = JointRewardModel(backbone, reward_token_id, cfg.model.head_hidden, lm_ce=cfg.model.lm_ce,
                                 head_input_norm=cfg.model.head_input_norm)
    if cfg.model.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        backbone.config.use_cache = False
    if cfg.model.lora.r > 0:
        _apply_lora(model, cfg)
        if keep is not None:
            _match_zero3_dtype(model, _dtype(cfg))
    _freeze(model, cfg)
    _freeze_lm_head_if_rank_only(model, cfg)
    model._hf_ds_config = keep  # keep zero.Init context config alive with the model
    return model


# ----------------------------------------------------------------------------- optimizer, schedule

HEAD_PREFIXES = ("reward_head.",)
REWARD_TOKEN_PARAM = "reward_head.token.weight"


def param_groups(model, cfg: JRMConfig) -> list[dict[str, Any]]:
    """Backbone at ``optim.lr``; reward head and reward-token embedding (both under ``reward_head.``) at
    ``optim.head_lr``, the embedding at ``optim.reward_token_lr`` when set; no weight decay on the
    head/biases/norms."""
    groups = {"backbone": [], "backbone_no_decay": [], "head": [], "reward_token": []}
    own_token = cfg.optim.reward_token_lr is not None
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if own_token and n == REWARD_TOKEN_PARAM:
            groups["reward_token"].append(p)
        elif n.startswith(HEAD_PREFIXES):
            groups["head"].append(p)
        elif p.ndim < 2 or n.endswith(".bias") or "norm" in n.lower():
            groups["backbone_no_decay"].append(p)
        else:
            groups["backbone"].append(p)
    o = cfg.optim
    out = [
        {"params": groups["backbone"], "lr": o.lr, "weight_decay": o.weight_decay, "name": "backbone"},
        {"params": groups["backbone_no_decay"], "lr": o.lr, "weight_decay": 0.0, "name": "backbone_no_decay"},
        {"params": groups["head"], "lr": o.head_lr, "weight_decay": 0.0, "name": "head"},
        {"params": groups["reward_token"], "lr": o.reward_token_lr, "weight_decay": 0.0, "name": "reward_token"},
    ]
    return [g for g in out if g["params"]]


def build_optimizer(groups: list[dict[str, Any]], cfg: JRMConfig):
    o = cfg.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, **kw)
    if o.name == "cpu_adam":
        if cfg.zero.offload_optimizer != "cpu":
            raise ConfigError("optim.name=cpu_adam needs zero.offload_optimizer=cpu (DeepSpeed's CPU Adam steps the "
                              "offloaded fp32 partitions)")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    if o.name in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if o.name == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, **kw)
    raise ConfigError(f"optim.name={o.name!r}: unknown")


def lr_lambda(cfg: JRMConfig):
    """Multiplier of each group's base LR at optimizer step ``s`` (0-based): linear warmup, then
    constant, cosine to ``min_lr_ratio``, or WSD (warmup-stable-decay: flat, then linear decay over
    the last ``decay_ratio`` of the steps)."""
    o = cfg.optim
    total = max(cfg.train.max_steps, 1)
    warm = int(round(o.warmup_ratio * total))
    lo = o.min_lr_ratio

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "cosine":
            t = min(1.0, (s - warm) / max(total - warm, 1))
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))
        decay = max(int(round(o.decay_ratio * total)), 1)  # wsd
        start = total - decay
        if s < start:
            return 1.0
        t = min(1.0, (s - start) / decay)
        return lo + (1 - lo) * (1 - t)
    return f


def group_lr_lambdas(cfg: JRMConfig, groups: list[dict[str, Any]]) -> list:
    """One multiplier per param group: ``lr_lambda`` for all, except that with ``optim.head_only_steps = N``
    the backbone groups stay at 0 for the first N steps (fit the head first, then fine-tune: a random head's
    gradients would distort the pretrained features; LP-FT, Kumar et al. 2022)."""
    f, n = lr_lambda(cfg), cfg.optim.head_only_steps

    def backbone(s: int) -> float:
        return 0.0 if s < n else f(s)
    return [backbone if n and str(g.get("name", "")).startswith("backbone") else f for g in groups]


# ----------------------------------------------------------------------------- initialize

@dataclass
class Engine:
    engine: Any  # deepspeed.DeepSpeedEngine
    ds_config: dict
    model: Any  # the JointRewardModel (engine.module)


def initialize(cfg: JRMConfig, reward_token_id: int, world_size: int, load_universal: bool = False) -> Engine:
    import deepspeed

    ds = deepspeed_config(cfg, world_size, load_universal)
    model = build_model(cfg, reward_token_id, ds)
    opt = build_optimizer(param_groups(model, cfg), cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, config=ds,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, group_lr_lambdas(cfg, o.param_groups)))
    return Engine(engine, ds, model)


def partition_stats(model) -> dict[str, int]:
    """Parameters held by this rank vs the full model: ZeRO-3 params carry ``ds_numel`` (full size)
    and ``ds_tensor`` (this rank's partition); otherwise the rank holds everything."""
    full = local = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):
            full += int(p.ds_numel)
            local += int(p.ds_tensor.numel())
        else:
            full += p.numel()
            local += p.numel()
    return {"params_total": full, "params_local": local}


def optimizer_state_bytes(engine) -> int:
    """Bytes of optimizer state this rank holds: the fp32 master partitions (ZeRO keeps them outside the
    client optimizer's param_groups between steps) plus the optimizer's own state (moments, 8-bit blocks)."""
    zo = engine.optimizer
    opt = getattr(zo, "optimizer", zo)
    masters = getattr(zo, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if masters is None:
        masters = getattr(zo, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if masters is None:
        masters = [p for g in opt.param_groups for p in g["params"]]
    n = sum(t.numel() * t.element_size() for t in masters)
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.ndim > 0:
                n += v.numel() * v.element_size()
    return n
