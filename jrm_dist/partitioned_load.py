"""Load a sharded safetensors checkpoint straight into ZeRO-3 partitions, one tensor at a time.

Why not ``from_pretrained`` under ``HfDeepSpeedConfig``: transformers 5 reads each whole shard into
every rank's memory before it scatters it (measured on Qwen2.5-VL-7B, 2 CPU ranks: 11.7 and 12.4 GB
anonymous RSS per rank while loading, and the machine's 24 GB ran out). Here the model is built
partitioned (``zero.Init`` through transformers' own ``_from_config``), then every rank copies its own
partition of each tensor from the memory-mapped shard, reading only the rows that hold it: no collective
moves weights, and a rank holds its partitions plus ~1/world of one tensor (page cache aside).

Keys may be in the released layout (``model.layers.*``, ``visual.*``) or transformers 5's
(``model.language_model.*``, ``model.visual.*``): both are accepted, as transformers itself does.
Every parameter must be found and every checkpoint tensor used; shapes must match: anything else is an
error naming the file and the key.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_NATIVE_TO_RELEASED = (("model.visual.", "visual."), ("model.language_model.", "model."))


def checkpoint_keys(path: str | os.PathLike) -> dict[str, Path]:
    """key -> safetensors file of a checkpoint folder (sharded with an index, or one ``model.safetensors``)."""
    d = Path(path)
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{idx}: not a safetensors index ({e})") from None
        return {k: d / f for k, f in wm.items()}
    single = d / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"{d}: no model.safetensors.index.json or model.safetensors")


def checkpoint_name(native: str, keys: dict) -> str | None:
    """The checkpoint key holding the parameter ``native`` (transformers 5 name), in either layout."""
    if native in keys:
        return native
    for a, b in _NATIVE_TO_RELEASED:
        if native.startswith(a) and b + native[len(a):] in keys:
            return b + native[len(a):]
    return None


def native_name(key: str) -> str:
    """The transformers 5 parameter name of a checkpoint key in either layout."""
    if any(key.startswith(a) for a, _ in _NATIVE_TO_RELEASED):
        return key
    for a, b in _NATIVE_TO_RELEASED:
        if key.startswith(b):
            return a + key[len(b):]
    return key


def largest_tensor(path: str | os.PathLike) -> tuple[str, int]:
    """(key, element count) of the checkpoint's largest tensor, from the safetensors headers only."""
    from safetensors import safe_open

    best = ("", 0)
    by_file: dict[Path, list[str]] = {}
    for k, f in checkpoint_keys(path).items():
        by_file.setdefault(f, []).append(k)
    for f, ks in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for k in ks:
                n = 1
                for d in h.get_slice(k).get_shape():
                    n *= d
                best = max(best, (k, n), key=lambda t: t[1])
    return best


def check_nvme_buffers(path: str | os.PathLike, world: int, buffer_size: int) -> None:
    """DeepSpeed swaps each parameter partition in through one buffer of ``zero.nvme_buffer_size`` elements and
    asserts deep inside the first gather when one is too small: say so before anything is built."""
    key, numel = largest_tensor(path)
    need = -(-numel // world)
    if need > buffer_size:
        from jrm_dist.config import ConfigError

        raise ConfigError(f"zero.nvme_buffer_size={buffer_size} elements is smaller than the largest parameter "
                          f"partition: {key} of {path} has {numel} elements, {need} per rank on {world} ranks; "
                          f"set zero.nvme_buffer_size>={need}")


def model_class(cfg):
    """The image-text-to-text class of a config, looked up in transformers' auto mapping (``from_config`` of the
    auto class also probes for hub code and optional libraries, which a checkout's ``kernels/`` folder confuses)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(cfg)]


def build_partitioned(path: str | os.PathLike, dtype: torch.dtype, attn_implementation: str):
    """The backbone of ``path`` constructed under ``zero.Init`` (the caller keeps an ``HfDeepSpeedConfig``
    alive), its weights not yet loaded."""
    from unittest import mock

    import transformers.integrations.deepspeed as hf_ds
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))
    # transformers initialises every partitioned module after construction (gathering each, the 152k-row
    # matrices included, on every rank). Every parameter is overwritten by load_into_partitions, which checks
    # that none is missed, so that pass is skipped: minutes and a 1 GB gather saved at 7B.
    with mock.patch.object(hf_ds, "initialize_weights_zero3", lambda model: None):
        return model_class(cfg)._from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)


def _partition_slot(p):
    """(flat start, length, rank) of this rank's ZeRO-3 partition of ``p``, or None when the partition cannot be
    written in place (already gathered, offloaded, or a layout other than DeepSpeed's ceil(numel / world) split)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    t = getattr(p, "ds_tensor", None)
    if t is None or p.ds_status != ZeroParamStatus.NOT_AVAILABLE or getattr(t, "final_location", None) is not None:
        return None
    group = getattr(p, "ds_process_group", None)
    world = torch.distributed.get_world_size(group=group)
    size = -(-p.ds_numel // world)
    if t.numel() != size or t.device.type == "meta":
        return None
    rank = torch.distributed.get_rank(group=group)
    start = rank * size
    return start, max(0, min(size, p.ds_numel - start)), rank


def _read_flat(handle, key: str, shape: tuple, start: int, length: int) -> torch.Tensor:
    """Elements [start, start + length) of the row-major tensor ``key``, reading only the rows that hold them."""
    if len(shape) == 0:
        return handle.get_tensor(key).reshape(1)[start:start + length]
    cols = 1
    for s in shape[1:]:
        cols *= s
    r0, r1 = start // cols, -(-(start + length) // cols)
    block = handle.get_slice(key)[r0:r1]
    return block.reshape(-1).narrow(0, start - r0 * cols, length)


@torch.no_grad()
def load_into_partitions(model: torch.nn.Module, path: str | os.PathLike, progress: bool = True) -> dict:
    """Fill ``model``'s (ZeRO-3 partitioned) parameters from the checkpoint at ``path``; returns counts.

    Each rank copies its own partition of each tensor straight from the memory-mapped shard (no collective,
    nothing gathered); a parameter whose partition is not in memory (offloaded) goes through
    ``GatheredParameters(modifier_rank=0)`` instead."""
    import deepspeed
    from safetensors import safe_open
    from tqdm import tqdm

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    keys = checkpoint_keys(path)
    plan, missing = [], []
    for name, p in model.named_parameters():  # tied weights once (remove_duplicate)
        key = checkpoint_name(name, keys)
        if key is None:
            missing.append(name)
        else:
            plan.append((name, p, key))
    tied_out = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [n for n in missing if not (tied_out and n.endswith("lm_head.weight"))]
    if missing:
        raise ValueError(f"{path}: {len(missing)} parameter(s) not in the checkpoint, e.g. {missing[:3]}")
    stray = sorted(k for k in set(keys) - {key for _, _, key in plan}
                   if not (tied_out and k.endswith("lm_head.weight")))
    if stray:
        raise ValueError(f"{path}: {len(stray)} checkpoint tensor(s) match no parameter, e.g. {stray[:3]}")
    plan.sort(key=lambda t: (str(keys[t[2]]), t[2]))  # file by file: each shard is opened (mmapped) once
    handle, open_file = None, None
    counts = {"tensors": len(plan), "in_place": 0, "gathered": 0, "bytes_read": 0}
    bar = tqdm(plan, desc="loading into ZeRO-3 partitions", unit="tensor", disable=not progress or rank != 0)
    try:
        for name, p, key in bar:
            if keys[key] != open_file:
                if handle is not None:
                    handle.__exit__(None, None, None)
                handle, open_file = safe_open(str(keys[key]), framework="pt").__enter__(), keys[key]
            shape = tuple(handle.get_slice(key).get_shape())
            if shape != tuple(getattr(p, "ds_shape", p.shape)):
                raise ValueError(f"{open_file}: {key} has shape {shape}, the model's {name} "
                                 f"{tuple(getattr(p, 'ds_shape', p.shape))}")
            slot = _partition_slot(p)
            agreed = torch.tensor([slot is not None], dtype=torch.int32)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)  # every rank takes one path
            if agreed.item():
                start, length, _ = slot
                if length:
                    src = _read_flat(handle, key, shape, start, length)
                    p.ds_tensor.narrow(0, 0, length).copy_(src)
                    counts["bytes_read"] += src.numel() * src.element_size()
                counts["in_place"] += 1
            else:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if rank == 0:
                        src = handle.get_tensor(key)
                        p.copy_(src)
                        counts["bytes_read"] += src.numel() * src.element_size()
                counts["gathered"] += 1
    finally:
        if handle is not None:
            handle.__exit__(None, None, None)
    return counts


def load_backbone_partitioned(path: str | os.PathLike, dtype: torch.dtype, attn_implementation: str):
    """``build_partitioned`` + ``load_into_partitions``: the ZeRO-3 path of ``backbones.load_backbone``."""
    model = build_partitioned(path, dtype, attn_implementation)
    info = load_into_partitions(model, path)
    log.info("loaded %s into ZeRO-3 partitions: %d tensors (%d in place, %d gathered), %.2f GB read by this rank",
             path, info["tensors"], info["in_place"], info["gathered"], info["bytes_read"] / 1e9)
    return model
