"""jrm-plan: per-GPU memory and step-time planner for JRM training on Qwen2.5-VL (7B-72B) under ZeRO.

The machines this project is developed on have no GPU, so every large-scale claim is *computed* here and
the computation is checked against what can be measured (``bench/validate_plan.py``: DeepSpeed's own
estimator, the per-rank tensors of a real ZeRO-3 run on 2 CPU ranks, and the autograd-saved activations).

    jrm-plan --config configs/qwen2_5_vl_72b.yaml --nodes 4 --gpus-per-node 8 --gpu h200 [--json] [key=value ...]

The architecture comes from the model's ``config.json`` (``model.name`` as a local directory, or one of the
configs shipped in ``jrm_dist/model_configs`` for the released Qwen2.5-VL-7B/72B-Instruct ids). Nothing is
downloaded. Both the released flat layout and transformers-5's nested ``text_config`` layout are read.

Formulas (Ψ = parameter count, N = data-parallel GPUs, all figures per GPU)
---------------------------------------------------------------------------
Parameters are counted tensor by tensor from the architecture (exactly the HF module tree; checked against
``sum(p.numel())`` of the model built on the meta device in tests/test_plan.py): text embedding V·h,
per decoder layer q/k/v (with bias) + o + SwiGLU gate/up/down (3·h·I) + 2 RMSNorms, final norm, untied LM
head V·h; vision tower patch Conv3d (3·t·p²·hv), per block qkv/proj/gate/up/down (all with bias) + 2 norms,
the patch merger (RMSNorm, 4hv→4hv, 4hv→h); plus the JRM reward head (h→head_hidden→2) and its reward-token embedding (h).

Model states (ZeRO paper, Rajbhandari et al. 2020: 2Ψ bf16 params + 2Ψ bf16 grads + KΨ optimizer states,
K = 12 for mixed-precision Adam = fp32 master + m + v). Per trainable parameter we count
  params  p = 2 (bf16) | 4 (fp32);   grads  g = p (DeepSpeed's default grad-accumulation dtype is the model's)
  optimizer: Adam m, v in fp32 = 8, 8-bit Adam (bitsandbytes, blockwise, block 256) = 2 + 8/256,
             plus the fp32 master partition 4, which DeepSpeed keeps in fp32 training too (measured: 20 bytes
             per parameter in fp32, 16 in bf16, on a real ZeRO-3 run).
Frozen parameters (freeze_vision / freeze_merger / freeze_lm, LoRA) keep p only. Stage placement:
  stage 0: all replicated; 1: optimizer / N; 2: grads + optimizer / N; 3: params + grads + optimizer / N,
  and under stage 3 every tensor with numel < stage3_param_persistence_threshold stays whole on every rank
  (DeepSpeed "persistent" parameters; they dominate for tiny models, vanish for 7B/72B).
  offload_optimizer=cpu|nvme moves master + optimizer states (and, in DeepSpeed, the grad partition) off the
  GPU; offload_param moves the stage-3 parameter partition off the GPU.
ZeRO buffers (upper bounds): stage 3 gathers whole modules before use: p·min(Ψ, max(largest module,
  stage3_max_live_parameters)) gathered params + g·(largest module) full gradient before its reduce-scatter +
  the reduce bucket g·reduce_bucket_size (×2 for stage 1/2 with overlap_comm). DeepSpeed's estimator charges
  the same "4 bytes × largest layer". At the optimizer step DeepSpeed's ZeRO-3 flattens one sub-group
  (sub_group_size = 1e9 elements) of the gradient partition into fp32: +4·min(Ψ_trainable/N, 1e9), after the
  activations are freed, so the peak is max(forward/backward peak, model states + that step buffer).

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation", Sec. 4: 34·s·b·h + 5·a·s²·b bytes
per GPT layer in 16-bit, with dropout). Re-derived for the Qwen2.5-VL layers as transformers writes them (no
dropout, SwiGLU, GQA, RMSNorm computed in fp32, flash/SDPA attention that keeps no s×s scores) and checked
tensor by tensor with autograd's saved-tensor hooks (bench/validate_plan.py). Bytes per token per text
layer, a = 2 (bf16) or 4 (fp32) bytes per activation element:
  2 RMSNorms: each its fp32 input copy (4h) + normalised a·h + output a·h     = 8h + 4a·h
  q, k, v entering attention + the attention output (o_proj reads it as a view) = 2a·h + 2a·d_kv + 4·heads (lse)
     d_kv = kv_heads·head_dim with flash-attn (native GQA); SDPA/eager in transformers repeat k, v to h
     heads and also keep a per-layer [b, 1, s, s] mask: + a·s per token; eager keeps the probabilities too
  SwiGLU: gate out, SiLU out, up out, product entering down_proj             = 4a·I
  -> flash-attn: 8h + 6a·h + 2a·d_kv + 4a·I + 4·heads (7B bf16: 20h + 4·d_kv + 8I ≈ 220 KiB per token).
  Vision block per patch (the qkv output stays alive through its v view, rotated q/k copies, per-window
  outputs, proj input, fp32 rotary tables): 8hv + 11a·hv + 4a·Iv + 4·heads_v + 8·head_dim_v; merger per patch
  4hv + 4a·hv; patch-embedding input 3·t·p²·a. A frozen vision tower (+ merger) keeps nothing.
  With gradient checkpointing (one checkpoint per decoder layer / vision block, as HF does) only each
  layer's input (a·h per token) is kept, plus one layer's full activations while it is recomputed.
  Outside the layers: the final norm (4h + 2a·h per token).
LM-loss buffer (V = 152064): fused (jrm_kernels, ours): FUSED_CE_LIVE_TILES fp32 logits tiles of
  FUSED_CE_BLOCK_ELEMS +
  the labelled rows' hidden (a·h) and fp32 gradient (4h) + the fp32 LM-head weight-gradient accumulator 4·V·h;
  reference (jrm_dist.losses.masked_lm_loss): N_lab·V·8 (fp32 logits + the log-probs kept for backward, then
  their gradients; measured on CPU: 257 MiB at N=1024, V=32768) + an fp32 copy of the weight 4·V·h (bf16 only); full (HF / EditReward-style): all b·s positions,
  N·V·(a + 4 + 4) (the logits, the fp32 log-probs kept for backward, the fp32 gradient).

Step time and MFU. Model FLOPs per step (PaLM appendix B convention, causal attention):
  text 6·Ψ_text_dense·tokens + 6·L·h·s per token (attention), LM head 6·V·h per *labelled* token (fused or
  reference) or per token (full); vision 6·Ψ_vision·patches + 12·hv·s_att per patch per block (s_att = the
  window for window blocks, the image for full-attention blocks); frozen parts cost only their forward 2Ψ.
  Gradient checkpointing adds one forward to the hardware FLOPs (not to model FLOPs).
  compute time = hardware FLOPs / (peak · efficiency) with efficiency = --compute-eff (the fraction of bf16
  peak that large GEMMs reach, 0.6 by default — an assumption, not a measurement);
  ZeRO-3 traffic per micro-step = 2·p·Ψ (two all-gathers) + g·Ψ_trainable (reduce-scatter) × (N-1)/N, over
  NVLink within a node or the per-GPU network bandwidth across nodes; stage 1/2: 2·g·Ψ_trainable per step.
  Group packing (data.packing=group): the text stack sees groups·(P + K·(mean − P)) tokens (P = chat header +
  the shared source images, no padding) and the vision tower encodes groups·(S + K·(I − S)) images (S shared
  of I per sequence); attention spans a mean sequence instead of the padded length.
  step = max(compute, comm) with overlap_comm (else their sum) + the optimizer update
  (≈ 32 bytes per local trainable parameter through HBM). MFU = model FLOPs / (step time · N · peak).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from jrm_dist.config import ConfigError, JRMConfig, load_config

GIB = 1024 ** 3
# Shipped architecture files for released models (facts of their config.json; the user points model.name at
# a local copy for training, the planner only needs the architecture).
SHIPPED_CONFIGS = {
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_5_vl_7b.json",
    "Qwen/Qwen2.5-VL-72B-Instruct": "qwen2_5_vl_72b.json",
}
# jrm_kernels' CPU tile of fp32 logits (kernels/_ce_torch.py DEFAULT_BLOCK_ELEMS; a test keeps them equal),
# and how many such tiles are live at once (the tile, its softmax/gradient, a temporary): an upper bound.
FUSED_CE_BLOCK_ELEMS = 1 << 20
FUSED_CE_LIVE_TILES = 3
BNB_BLOCK = 256  # bitsandbytes blockwise 8-bit optimizer state block (one fp32 absmax per block and state)
DS_SUB_GROUP = 1_000_000_000  # DeepSpeed zero_optimization.sub_group_size default
# Chat-template tokens before the first image (Qwen2.5-VL system turn + "<|im_start|>user\n"), shared by a
# group's candidates under data.packing=group together with the source images and their vision start/end tokens.
PROMPT_HEADER_TOKENS = 20

# name: (memory GiB as nvidia-smi reports, dense bf16 peak TFLOP/s, HBM TB/s, NVLink GB/s per GPU usable
# by a collective, network GB/s per GPU across nodes)
GPUS = {
    "h100": (79.6, 989.0, 3.35, 360.0, 45.0),
    "h200": (140.4, 989.0, 4.8, 360.0, 45.0),
    "a100": (79.2, 312.0, 2.0, 240.0, 22.0),
}


class PlanError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------- architecture
@dataclass
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool
    v_depth: int
    v_hidden: int
    v_intermediate: int
    v_heads: int
    patch: int
    temporal_patch: int
    merge: int
    out_hidden: int
    in_channels: int
    window_size: int
    fullatt_blocks: list[int] = field(default_factory=list)
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _field(d: dict, keys: tuple[str, ...], where: str, source: str, default=None):
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    if default is not None:
        return default
    raise PlanError(f"{source}: missing field {where}{keys[0]} in the model config")


def read_arch(cfg: dict, source: str = "<config>") -> Arch:
    """Architecture facts from a Qwen2.5-VL config.json (released flat layout or nested ``text_config``)."""
    if not isinstance(cfg, dict):
        raise PlanError(f"{source}: expected a JSON object")
    mt = cfg.get("model_type", "")
    if mt not in ("qwen2_5_vl", "qwen2_vl"):
        raise PlanError(f"{source}: model_type={mt!r}; the planner knows the Qwen2-VL/Qwen2.5-VL architecture only")
    text = cfg.get("text_config") or {}
    t = {**cfg, **text} if isinstance(text, dict) else cfg
    pre = "text_config." if text else ""
    v = cfg.get("vision_config")
    if not isinstance(v, dict):
        raise PlanError(f"{source}: missing field vision_config in the model config")

    def ti(*k, default=None):
        val = _field(t, k, pre, source, default)
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise PlanError(f"{source}: field {pre}{k[0]}={val!r} must be a non-negative integer")
        return val

    def vi(*k, default=None):
        val = _field(v, k, "vision_config.", source, default)
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise PlanError(f"{source}: field vision_config.{k[0]}={val!r} must be a non-negative integer")
        return val

    hidden = ti("hidden_size")
    arch = Arch(
        hidden=hidden, intermediate=ti("intermediate_size"), layers=ti("num_hidden_layers"),
        heads=ti("num_attention_heads"), kv_heads=ti("num_key_value_heads", default=ti("num_attention_heads")),
        vocab=ti("vocab_size"), tie_embeddings=bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
        v_depth=vi("depth"), v_hidden=vi("hidden_size", "embed_dim"), v_intermediate=vi("intermediate_size"),
        v_heads=vi("num_heads"), patch=vi("patch_size", "spatial_patch_size"),
        temporal_patch=vi("temporal_patch_size", default=2), merge=vi("spatial_merge_size", default=2),
        out_hidden=vi("out_hidden_size", default=hidden), in_channels=vi("in_channels", "in_chans", default=3),
        window_size=vi("window_size", default=112), fullatt_blocks=list(v.get("fullatt_block_indexes") or []),
        source=source,
    )
    if arch.heads == 0 or arch.hidden % arch.heads:
        raise PlanError(f"{source}: hidden_size={arch.hidden} is not divisible by num_attention_heads={arch.heads}")
    if arch.out_hidden != arch.hidden:
        raise PlanError(f"{source}: vision_config.out_hidden_size={arch.out_hidden} != text hidden_size={arch.hidden}")
    return arch


def load_arch(model_name: str, model_config: str | None = None) -> Arch:
    """``--model-config`` file, else ``model.name``/config.json, else a shipped config for a released id."""
    if model_config:
        path = Path(model_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise PlanError(f"--model-config {model_config}: no such file")
        return read_arch(_read_json(path), str(path))
    local = Path(model_name) / "config.json"
    if local.exists():
        return read_arch(_read_json(local), str(local))
    if model_name in SHIPPED_CONFIGS:
        res = resources.files("jrm_dist") / "model_configs" / SHIPPED_CONFIGS[model_name]
        return read_arch(json.loads(res.read_text()), f"jrm_dist/model_configs/{SHIPPED_CONFIGS[model_name]}")
    raise PlanError(f"model.name={model_name!r} is neither a directory with config.json nor one of the shipped "
                    f"configs ({', '.join(SHIPPED_CONFIGS)}); pass --model-config PATH")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: invalid JSON: {e}") from None


# ------------------------------------------------------------------------------------------------ parameter count
@dataclass
class Tensor:
    """One parameter tensor class: ``count`` identical tensors of ``numel`` in ``part``, module ``module``."""
    part: str  # vision | merger | text | embed | lm_head | head
    module: str
    numel: int
    count: int = 1


def inventory(a: Arch, head_hidden: int) -> list[Tensor]:
    """Every parameter tensor of Qwen2_5_VLForConditionalGeneration + the JRM reward head."""
    h, kv, hv, iv = a.hidden, a.kv_dim, a.v_hidden, a.v_intermediate
    L, D = a.layers, a.v_depth
    out = [Tensor("vision", "patch_embed", a.in_channels * a.temporal_patch * a.patch ** 2 * hv)]
    for mod, shape in (("norm1", hv), ("norm2", hv)):
        out.append(Tensor("vision", mod, shape, D))
    for mod, o, i in (("attn.qkv", 3 * hv, hv), ("attn.proj", hv, hv), ("mlp.gate_proj", iv, hv),
                      ("mlp.up_proj", iv, hv), ("mlp.down_proj", hv, iv)):
        out += [Tensor("vision", mod, o * i, D), Tensor("vision", mod, o, D)]
    m = hv * a.merge ** 2
    out += [Tensor("merger", "ln_q", hv), Tensor("merger", "mlp.0", m * m), Tensor("merger", "mlp.0", m),
            Tensor("merger", "mlp.2", a.out_hidden * m), Tensor("merger", "mlp.2", a.out_hidden)]
    out.append(Tensor("embed", "embed_tokens", a.vocab * h))
    for mod, o, i, bias in (("q_proj", h, h, True), ("k_proj", kv, h, True), ("v_proj", kv, h, True),
                            ("o_proj", h, h, False), ("gate_proj", a.intermediate, h, False),
                            ("up_proj", a.intermediate, h, False), ("down_proj", h, a.intermediate, False)):
        out.append(Tensor("text", mod, o * i, L))
        if bias:
            out.append(Tensor("text", mod, o, L))
    out += [Tensor("text", "input_layernorm", h, L), Tensor("text", "post_attention_layernorm", h, L),
            Tensor("text", "norm", h)]
    if not a.tie_embeddings:
        out.append(Tensor("lm_head", "lm_head", a.vocab * h))
    out += [Tensor("head", "fc", h * head_hidden), Tensor("head", "fc", head_hidden),
            Tensor("head", "out", head_hidden * 2), Tensor("head", "out", 2),
            Tensor("head", "token", h)]  # the reward-token embedding (model.RewardTokenEmbedding)
    return out


def hf_meta_counts(config_json: dict) -> tuple[int, int]:
    """(total params, largest module's own params) of the transformers model built on the meta device from
    a config.json dict: the independent count ``inventory`` is checked against (tests, bench/validate_plan.py).
    Counted by identity: every meta tensor has data_ptr 0, so pointer-based dedup (DeepSpeed's) would fail."""
    import tempfile

    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(config_json))
        cfg = AutoConfig.from_pretrained(d)
    with torch.device("meta"):
        m = Qwen2_5_VLForConditionalGeneration._from_config(cfg)
    total = sum({id(p): p.numel() for p in m.parameters()}.values())
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in m.modules())
    return total, largest


def param_count(inv: list[Tensor], parts: set[str] | None = None) -> int:
    return sum(t.numel * t.count for t in inv if parts is None or t.part in parts)


def largest_module(inv: list[Tensor]) -> int:
    """Params of the largest single module (weight + bias): what ZeRO-3 gathers at once."""
    per: dict[tuple[str, str], int] = {}
    for t in inv:
        per[(t.part, t.module)] = per.get((t.part, t.module), 0) + t.numel
    return max(per.values())


def lora_params(a: Arch, r: int, targets: list[str]) -> int:
    """LoRA adapters (A: r×in, B: out×r) on every Linear whose name peft matches: the text decoder's
    projections, and the vision blocks' gate/up/down_proj when those names are targeted."""
    h, kv, i, hv, iv = a.hidden, a.kv_dim, a.intermediate, a.v_hidden, a.v_intermediate
    text = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    vision = {"gate_proj": (iv, hv), "up_proj": (iv, hv), "down_proj": (hv, iv)}
    return (sum(r * (o + n) * a.layers for name, (o, n) in text.items() if name in targets)
            + sum(r * (o + n) * a.v_depth for name, (o, n) in vision.items() if name in targets))


def _vision_trainable(cfg: JRMConfig) -> bool:
    """peft freezes the whole base model: the vision tower then trains only through adapters it matches."""
    if cfg.model.lora.r > 0:
        return any(t in cfg.model.lora.target_modules for t in ("gate_proj", "up_proj", "down_proj"))
    return not cfg.model.freeze_vision


# ------------------------------------------------------------------------------------------------------- the plan
@dataclass
class Workload:
    groups: int  # groups per micro-batch per GPU (data.groups_per_batch)
    candidates: int  # K candidates per group (one sequence each)
    seq_len: int  # tokens per sequence (padded length)
    images_per_seq: int
    image_tokens: int  # merged tokens per image
    labelled: int  # rationale tokens per sequence (LM labels)
    # data.packing=group: one packed row per micro-batch, no padding, each group's shared prefix (chat header +
    # ``shared_images`` source images = ``shared_tokens``) once; sequences average ``mean_seq_len`` tokens.
    packed: bool = False
    shared_tokens: int = 0
    shared_images: int = 0
    mean_seq_len: int = 0  # 0: seq_len

    @property
    def seqs(self) -> int:
        return self.groups * self.candidates

    @property
    def attn_len(self) -> int:
        """Keys a token attends to at most: the padded length, or (packed) a mean sequence."""
        return (self.mean_seq_len or self.seq_len) if self.packed else self.seq_len

    @property
    def tokens(self) -> int:
        """Tokens the text stack processes per micro-batch (padding included when not packed)."""
        if not self.packed:
            return self.seqs * self.seq_len
        return self.groups * (self.shared_tokens + self.candidates * (self.attn_len - self.shared_tokens))

    @property
    def images(self) -> int:
        """Images the vision tower encodes per micro-batch (packed: each group's source images once)."""
        if not self.packed:
            return self.seqs * self.images_per_seq
        return self.groups * (self.shared_images + self.candidates * (self.images_per_seq - self.shared_images))


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    peak_tflops: float
    hbm_tbs: float
    nvlink_gbs: float
    net_gbs: float

    @property
    def n(self) -> int:
        return self.nodes * self.gpus_per_node


def trainable_parts(cfg: JRMConfig) -> set[str]:
    parts = {"vision", "merger", "text", "embed", "lm_head", "head"}
    if cfg.model.freeze_vision:
        parts.discard("vision")
    if cfg.model.freeze_merger:
        parts.discard("merger")
    if cfg.model.freeze_lm:
        parts -= {"text", "embed", "lm_head"}
    return parts


def model_states(cfg: JRMConfig, inv: list[Tensor], arch: Arch, n: int) -> dict:
    """Per-GPU bytes of params / grads / optimizer states (+ what went to CPU) — the ZeRO-paper accounting."""
    z = cfg.zero
    pb = 2 if cfg.model.precision == "bf16" else 4
    gb = pb
    master = 4  # DeepSpeed keeps a separate fp32 master partition, in fp32 training too (measured)
    opt_b = 8.0 if cfg.optim.name in ("adamw", "cpu_adam") else 2.0 + 8.0 / BNB_BLOCK
    total = param_count(inv)
    if cfg.model.lora.r > 0:  # adapters (extra parameters) + the reward head with its token row (engine.py)
        adapters = lora_params(arch, cfg.model.lora.r, cfg.model.lora.target_modules)
        trainable = adapters + param_count(inv, {"head"})
        total += adapters
    else:
        trainable = param_count(inv, trainable_parts(cfg))
    stage = z.stage
    shard_p = n if stage == 3 else 1
    shard_g = n if stage >= 2 else 1
    shard_o = n if stage >= 1 else 1
    params = pb * total / shard_p
    persistent = 0
    if stage == 3:
        persistent = sum(t.numel * t.count for t in inv if t.numel < z.stage3_param_persistence_threshold)
        params += pb * persistent
    grads = gb * trainable / shard_g
    optim = (master + opt_b) * trainable / shard_o
    cpu = 0.0
    if z.offload_optimizer != "none":  # to CPU RAM, or through it to disk (nvme)
        cpu += (optim + (grads if stage >= 2 else 0.0)) * (z.offload_optimizer == "cpu")
        optim = 0.0
        if stage >= 2:
            grads = 0.0
    if z.offload_param != "none":
        cpu += pb * total / shard_p * (z.offload_param == "cpu")
        params -= pb * total / shard_p
    return {"params": params, "grads": grads, "optimizer": optim, "cpu_offloaded": cpu,
            "total_params": total, "trainable_params": trainable, "persistent_params": persistent,
            "param_bytes": pb, "grad_bytes": gb}


def zero_buffers(cfg: JRMConfig, inv: list[Tensor], ms: dict, n: int) -> dict:
    z = cfg.zero
    pb, gb = ms["param_bytes"], ms["grad_bytes"]
    big = largest_module(inv)
    if z.stage == 3:
        gathered = pb * min(ms["total_params"], max(big, z.stage3_max_live_parameters))
        grad_full = gb * big
        bucket = gb * z.reduce_bucket_size if z.contiguous_gradients else 0
    else:
        gathered, grad_full = 0, 0
        bucket = gb * z.reduce_bucket_size * (2 if z.overlap_comm and z.stage >= 1 else 1)
    step = 0.0
    if z.stage == 3 and z.offload_optimizer == "none":
        step = 4 * min(ms["trainable_params"] / n, DS_SUB_GROUP)
    return {"gathered_params": gathered, "full_grad": grad_full, "reduce_bucket": bucket, "step_fp32_grad": step}


def _expands_kv(attn: str) -> bool:
    """transformers' SDPA/eager paths repeat k/v to all heads and build an [b, 1, s, s] mask; flash-attn doesn't.
    ``auto`` means flash-attn 2 on a GPU (the planner's target)."""
    return attn in ("sdpa", "eager")


def text_layer_act(a: Arch, ab: int, attn: str = "auto", seq_len: int = 0) -> float:
    """Bytes per token kept by one decoder layer for backward (see module docstring)."""
    h = a.hidden
    kv = h if _expands_kv(attn) else a.kv_dim
    out = 8 * h + 6 * ab * h + 2 * ab * kv + 4 * ab * a.intermediate + 4 * a.heads
    if _expands_kv(attn):
        out += ab * seq_len  # the per-layer additive mask
    if attn == "eager":
        out += 2 * ab * a.heads * seq_len  # scores and probabilities
    return out


def vision_block_act(a: Arch, ab: int) -> float:
    hv = a.v_hidden
    return 8 * hv + 11 * ab * hv + 4 * ab * a.v_intermediate + 4 * a.v_heads + 8 * (hv // a.v_heads)


def _text_backward(cfg: JRMConfig) -> int:
    """FLOP multiplier of the text stack: 6 (fwd + input and weight grads), 4 (frozen, but gradients must
    reach a trainable vision tower/merger or LoRA adapters), 2 (forward only)."""
    m = cfg.model
    if m.lora.r > 0:
        return 4  # base weights frozen: input gradients only (the adapters' own cost is negligible)
    if not m.freeze_lm:
        return 6
    if not m.freeze_vision or not m.freeze_merger:
        return 4
    return 0


def activations(cfg: JRMConfig, a: Arch, w: Workload, ab: int) -> dict:
    ckpt = cfg.model.gradient_checkpointing
    attn = cfg.model.attn_implementation
    tokens = w.tokens
    patches = w.images * w.image_tokens * a.merge ** 2
    per_layer = text_layer_act(a, ab, attn, w.attn_len) * tokens
    if _text_backward(cfg) == 0:
        text = 0.0  # nothing before the reward head needs a gradient: the frozen stack keeps no activations
    elif ckpt:
        text = a.layers * ab * a.hidden * tokens + per_layer
    else:
        text = a.layers * per_layer
    text += (4 * a.hidden + 2 * ab * a.hidden) * tokens  # final norm
    vis = 0.0
    if _vision_trainable(cfg):
        per_block = vision_block_act(a, ab) * patches
        vis = (a.v_depth * ab * a.v_hidden * patches + per_block) if ckpt else a.v_depth * per_block
        vis += a.in_channels * a.temporal_patch * a.patch ** 2 * ab * patches
    if _vision_trainable(cfg) or (cfg.model.lora.r == 0 and not cfg.model.freeze_merger):
        vis += (4 * a.v_hidden + 4 * ab * a.v_hidden) * patches
    return {"text": text, "vision": vis, "tokens": tokens, "patches": patches}


def loss_buffer(cfg: JRMConfig, a: Arch, w: Workload, ab: int, ce: str) -> float:
    V, h = a.vocab, a.hidden
    n_lab = w.seqs * w.labelled
    if cfg.loss.alpha == 0.0 and cfg.loss.alpha_schedule == "constant":
        return 0.0  # rank-only baseline: no LM loss
    if ce == "fused":
        return 4 * FUSED_CE_LIVE_TILES * min(FUSED_CE_BLOCK_ELEMS, max(n_lab, 1) * V) + n_lab * h * (ab + 4) + 4 * V * h
    if ce == "reference":
        return 8 * n_lab * V + (4 * V * h if ab != 4 else 0)
    if ce == "full":
        return (ab + 8) * w.tokens * V
    raise PlanError(f"--ce {ce!r}: expected fused, reference or full")


def flops(cfg: JRMConfig, a: Arch, w: Workload, ce: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per micro-step per GPU."""
    inv = inventory(a, cfg.model.head_hidden)
    tokens = w.tokens
    patches = w.images * w.image_tokens * a.merge ** 2
    text_dense = param_count(inv, {"text"})
    text_mult = _text_backward(cfg) or 2
    f_text = text_mult * text_dense * tokens + text_mult * a.layers * a.hidden * w.attn_len * tokens
    lm_tokens = tokens if ce == "full" else w.seqs * w.labelled
    f_lm = 0.0 if cfg.loss.alpha == 0.0 and cfg.loss.alpha_schedule == "constant" else 6 * a.vocab * a.hidden * lm_tokens
    v_mult = 6 if _vision_trainable(cfg) and cfg.model.lora.r == 0 else (4 if _vision_trainable(cfg) else 2)
    vis_params = param_count(inv, {"vision"})
    window = (a.window_size // a.patch) ** 2  # patches in one attention window
    per_image = w.image_tokens * a.merge ** 2  # patches of one image (full-attention blocks see all of them)
    n_full = len(a.fullatt_blocks)
    att = 2 * a.v_hidden * patches * (n_full * per_image + (a.v_depth - n_full) * min(window, per_image))
    f_vis = v_mult * vis_params * patches + v_mult * att
    f_merge = (6 if cfg.model.lora.r == 0 and not cfg.model.freeze_merger else 2) * param_count(inv, {"merger"}) * patches / a.merge ** 2
    model = f_text + f_lm + f_vis + f_merge
    hw = model
    if cfg.model.gradient_checkpointing:
        hw += (f_text + f_vis) / 3  # one extra forward of the checkpointed layers
    return model, hw


def plan_for(cfg: JRMConfig, a: Arch, w: Workload, c: Cluster, ce: str, margin: float, reserved_gib: float,
             compute_eff: float) -> dict:
    inv = inventory(a, cfg.model.head_hidden)
    ab = 2 if cfg.model.precision == "bf16" else 4
    ms = model_states(cfg, inv, a, c.n)
    zb = zero_buffers(cfg, inv, ms, c.n)
    act = activations(cfg, a, w, ab)
    lb = loss_buffer(cfg, a, w, ab, ce)
    states = ms["params"] + ms["grads"] + ms["optimizer"]
    buffers = zb["gathered_params"] + zb["full_grad"] + zb["reduce_bucket"]
    act_total = act["text"] + act["vision"]
    fwd_bwd = states + buffers + act_total + lb
    step_peak = states + zb["step_fp32_grad"]
    total = max(fwd_bwd, step_peak) + reserved_gib * GIB
    usable = c.gpu_mem_gib * (1 - margin) * GIB
    # step time
    model_f, hw_f = flops(cfg, a, w, ce)
    compute = hw_f / (c.peak_tflops * 1e12 * compute_eff)
    pb, gb = ms["param_bytes"], ms["grad_bytes"]
    frac = (c.n - 1) / c.n if c.n > 1 else 0.0
    if cfg.zero.stage == 3:
        traffic = (2 * pb * ms["total_params"] + gb * ms["trainable_params"]) * frac
    else:
        traffic = 2 * gb * ms["trainable_params"] * frac / cfg.train.grad_accum  # once per optimizer step
    bw = (c.nvlink_gbs if c.nodes == 1 else c.net_gbs) * 1e9
    comm = traffic / bw
    micro = max(compute, comm) if cfg.zero.overlap_comm else compute + comm
    update = 0.0
    if cfg.zero.offload_optimizer == "none":
        local = ms["trainable_params"] / (c.n if cfg.zero.stage >= 1 else 1)
        update = 32 * local / (c.hbm_tbs * 1e12) / cfg.train.grad_accum
    step = micro + update
    groups_s = w.groups * c.n / step
    return {
        "params_b": ms["total_params"] / 1e9,
        "trainable_b": ms["trainable_params"] / 1e9,
        "micro_batch": w.groups,
        "sequences_per_gpu": w.seqs,
        "params_gib": ms["params"] / GIB, "grads_gib": ms["grads"] / GIB, "optimizer_gib": ms["optimizer"] / GIB,
        "model_states_gib": states / GIB,
        "zero_buffers_gib": buffers / GIB,
        "step_fp32_grad_gib": zb["step_fp32_grad"] / GIB,
        "activations_text_gib": act["text"] / GIB, "activations_vision_gib": act["vision"] / GIB,
        "activations_gib": act_total / GIB,
        "loss_buffer_gib": lb / GIB,
        "reserved_gib": reserved_gib,
        "total_gib": total / GIB,
        "usable_gib": usable / GIB,
        "fits": total <= usable,
        "cpu_offloaded_gib_per_node": ms["cpu_offloaded"] * c.gpus_per_node / GIB,
        # ZeRO-Infinity swaps parameter partitions through buffer_count x buffer_size elements of host memory
        # per rank (zero.nvme_buffer_*; each buffer must hold the largest partition: the embedding's at 7B+)
        "nvme_buffers_gib_per_node": (cfg.zero.nvme_buffer_count * cfg.zero.nvme_buffer_size * ms["param_bytes"]
                                      * c.gpus_per_node / GIB if cfg.zero.offload_param == "nvme" else 0.0),
        "tokens_per_gpu": act["tokens"], "patches_per_gpu": act["patches"],
        "model_tflops_per_gpu_step": model_f / 1e12,
        "compute_s": compute, "comm_s": comm, "update_s": update, "step_s": step,
        "groups_per_s": groups_s, "sequences_per_s": groups_s * w.candidates,
        "tokens_per_s": act["tokens"] * c.n / step,
        "mfu": model_f / (step * c.peak_tflops * 1e12),
    }


def plan(cfg: JRMConfig, a: Arch, w: Workload, c: Cluster, ce: str = "fused", margin: float = 0.1,
         reserved_gib: float = 3.0, compute_eff: float = 0.6, max_search: int = 1024) -> dict:
    """The plan at ``w.groups`` plus the largest micro-batch (in groups) that fits, and its throughput."""
    cur = plan_for(cfg, a, w, c, ce, margin, reserved_gib, compute_eff)
    best, best_plan = 0, None
    lo, hi = 1, max_search
    first = plan_for(cfg, a, _with(w, 1), c, ce, margin, reserved_gib, compute_eff)
    if first["fits"]:
        while lo < hi:  # total memory grows monotonically with the micro-batch: bisect
            mid = (lo + hi + 1) // 2
            if plan_for(cfg, a, _with(w, mid), c, ce, margin, reserved_gib, compute_eff)["fits"]:
                lo = mid
            else:
                hi = mid - 1
        best = lo
        best_plan = plan_for(cfg, a, _with(w, best), c, ce, margin, reserved_gib, compute_eff)
    cur["max_micro_batch"] = best
    cur["at_max_micro_batch"] = None if best_plan is None else {
        k: best_plan[k] for k in ("total_gib", "activations_gib", "loss_buffer_gib", "step_s", "groups_per_s",
                                  "sequences_per_s", "tokens_per_s", "mfu")}
    return cur


def _with(w: Workload, groups: int) -> Workload:
    import dataclasses

    return dataclasses.replace(w, groups=groups)


def image_tokens_for(max_pixels: int, a: Arch) -> int:
    """Merged LM tokens of one image at ``max_pixels`` (each covers (patch·merge)² pixels)."""
    return max(1, max_pixels // (a.patch * a.merge) ** 2)


def workload_from(cfg: JRMConfig, a: Arch, args) -> Workload:
    img = image_tokens_for(cfg.data.max_pixels, a)
    seq = args.seq_len or cfg.data.max_length
    if args.images_per_seq * img >= seq:
        raise PlanError(f"{args.images_per_seq} images × {img} tokens (data.max_pixels={cfg.data.max_pixels}) do "
                        f"not fit in a {seq}-token sequence (data.max_length / --seq-len)")
    lab = 0 if not cfg.data.use_rationale else min(args.rationale_tokens, seq - args.images_per_seq * img)
    packed = cfg.data.packing == "group"
    shared_images = min(getattr(args, "shared_images", 1), args.images_per_seq - 1) if packed else 0
    mean = getattr(args, "mean_seq_len", None) or seq
    if packed and not shared_images * img < mean <= seq:
        raise PlanError(f"--mean-seq-len {mean}: must exceed the shared prefix ({shared_images} x {img} image tokens) "
                        f"and be at most the sequence length {seq}")
    return Workload(args.micro_batch or cfg.data.groups_per_batch, args.candidates, seq, args.images_per_seq, img, lab,
                    packed=packed, shared_tokens=shared_images * (img + 2) + PROMPT_HEADER_TOKENS if packed else 0,
                    shared_images=shared_images, mean_seq_len=mean if packed else 0)


# ----------------------------------------------------------------------------------------------------------- CLI
def _fmt(p: dict, cfg: JRMConfig, a: Arch, c: Cluster, w: Workload, ce: str) -> str:
    z = cfg.zero
    lines = [
        f"model      {a.source}: {p['params_b']:.2f} B params ({p['trainable_b']:.2f} B trainable), "
        f"hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}",
        f"cluster    {c.nodes} node(s) x {c.gpus_per_node} GPU = {c.n} GPUs, {c.gpu_mem_gib:g} GiB, "
        f"{c.peak_tflops:g} TFLOP/s bf16 peak",
        f"training   ZeRO-{z.stage}, {cfg.model.precision}, optimizer {cfg.optim.name}, offload optimizer="
        f"{z.offload_optimizer} param={z.offload_param}, gradient checkpointing "
        f"{'on' if cfg.model.gradient_checkpointing else 'off'}, LM CE {ce}",
        f"micro-batch {w.groups} group(s) x {w.candidates} candidates = {w.seqs} sequences x {w.seq_len} tokens "
        f"({w.images_per_seq} x {w.image_tokens} image tokens, {w.labelled} labelled) per GPU",
        (f"packing    group: one row of {w.tokens} tokens, no padding (sequences ~{w.attn_len} tokens, each group's "
         f"{w.shared_tokens}-token prefix with {w.shared_images} source image(s) once); {w.images} images encoded"
         if w.packed else f"packing    none: {w.tokens} tokens (padded), {w.images} images encoded"),
        "",
        f"per GPU                          GiB",
        f"  parameters               {p['params_gib']:9.2f}",
        f"  gradients                {p['grads_gib']:9.2f}",
        f"  optimizer states         {p['optimizer_gib']:9.2f}",
        f"  = model states           {p['model_states_gib']:9.2f}",
        f"  ZeRO buffers (gather/rs) {p['zero_buffers_gib']:9.2f}",
        f"  activations text         {p['activations_text_gib']:9.2f}",
        f"  activations vision       {p['activations_vision_gib']:9.2f}",
        f"  LM-loss buffer           {p['loss_buffer_gib']:9.2f}",
        f"  reserved (ctx/NCCL/frag) {p['reserved_gib']:9.2f}",
        f"  = total (peak)           {p['total_gib']:9.2f}   of {p['usable_gib']:.1f} usable -> "
        f"{'FITS' if p['fits'] else 'DOES NOT FIT'}",
    ]
    if p["cpu_offloaded_gib_per_node"]:
        lines.append(f"  CPU RAM per node for offloaded states: {p['cpu_offloaded_gib_per_node']:.1f} GiB")
    if p["nvme_buffers_gib_per_node"]:
        lines.append(f"  CPU RAM per node for NVMe swap buffers: {p['nvme_buffers_gib_per_node']:.1f} GiB")
    lines += [
        "",
        f"step (micro-batch {w.groups}): compute {p['compute_s']:.3f} s, ZeRO comm {p['comm_s']:.3f} s, "
        f"update {p['update_s']:.3f} s -> {p['step_s']:.3f} s, {p['sequences_per_s']:.1f} seq/s, "
        f"{p['tokens_per_s']:.0f} tok/s, MFU {100 * p['mfu']:.1f}%",
    ]
    m = p["at_max_micro_batch"]
    if m is None:
        lines.append("max micro-batch: 0 — even one group does not fit; raise the ZeRO stage, offload, enable "
                     "gradient checkpointing or shorten the sequence")
    else:
        lines.append(f"max micro-batch that fits: {p['max_micro_batch']} group(s) ({m['total_gib']:.1f} GiB) -> "
                     f"{m['step_s']:.3f} s/step, {m['sequences_per_s']:.1f} seq/s, {m['tokens_per_s']:.0f} tok/s, "
                     f"MFU {100 * m['mfu']:.1f}%")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jrm-plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training YAML (jrm_dist.config)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as for jrm-train")
    ap.add_argument("--model-config", help="config.json (or its directory) to read the architecture from")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    ap.add_argument("--gpu-mem", type=float, help="GiB per GPU (default: the --gpu preset)")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak per GPU (default: the --gpu preset)")
    ap.add_argument("--net-gbs", type=float, help="per-GPU network GB/s across nodes (default: the preset)")
    ap.add_argument("--micro-batch", type=int, help="groups per GPU micro-batch (default data.groups_per_batch)")
    ap.add_argument("--candidates", type=int, default=2, help="candidates per group (EditReward pairs: 2)")
    ap.add_argument("--images-per-seq", type=int, default=2, help="source + candidate image")
    ap.add_argument("--rationale-tokens", type=int, default=256, help="labelled LM tokens per sequence")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default data.max_length)")
    ap.add_argument("--mean-seq-len", type=int, help="data.packing=group: mean tokens per sequence (default --seq-len); "
                    "packed rows carry no padding")
    ap.add_argument("--shared-images", type=int, default=1, help="data.packing=group: source images per group "
                    "(shared by its candidates)")
    ap.add_argument("--ce", choices=("auto", "fused", "reference", "full"), default="auto",
                    help="LM-loss implementation (auto: from model.lm_ce)")
    ap.add_argument("--margin", type=float, default=0.1, help="fraction of GPU memory kept free")
    ap.add_argument("--reserved-gib", type=float, default=3.0, help="CUDA context, NCCL, allocator fragmentation")
    ap.add_argument("--compute-eff", type=float, default=0.6, help="fraction of peak reached by the compute")
    ap.add_argument("--json", action="store_true")
    return ap


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """(plan dict, printable breakdown) for parsed CLI arguments."""
    for name in ("nodes", "gpus_per_node", "candidates", "images_per_seq"):
        if getattr(args, name) < 1:
            raise PlanError(f"--{name.replace('_', '-')} must be >= 1")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise PlanError("--micro-batch must be >= 1")
    if not 0 <= args.margin < 1 or not 0 < args.compute_eff <= 1:
        raise PlanError("--margin must be in [0, 1) and --compute-eff in (0, 1]")
    cfg = load_config(args.config, args.overrides)
    arch = load_arch(cfg.model.name, args.model_config)
    mem, peak, hbm, nvl, net = GPUS[args.gpu]
    c = Cluster(args.nodes, args.gpus_per_node, args.gpu_mem or mem, args.peak_tflops or peak, hbm, nvl,
                args.net_gbs or net)
    w = workload_from(cfg, arch, args)
    ce = args.ce if args.ce != "auto" else ("fused" if cfg.model.lm_ce == "auto" else "reference")
    p = plan(cfg, arch, w, c, ce=ce, margin=args.margin, reserved_gib=args.reserved_gib, compute_eff=args.compute_eff)
    p["config"] = str(args.config)
    p["cluster"] = {"nodes": c.nodes, "gpus_per_node": c.gpus_per_node, "gpu": args.gpu, "gpu_mem_gib": c.gpu_mem_gib,
                    "peak_tflops": c.peak_tflops}
    p["ce"] = ce
    return p, _fmt(p, cfg, arch, c, w, ce)


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        p, text = run(args)
    except (PlanError, ConfigError) as e:
        print(f"jrm-plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
