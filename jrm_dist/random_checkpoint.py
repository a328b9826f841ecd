"""A real-size Qwen2.5-VL checkpoint with random weights, written tensor by tensor.

Why: the released 7B/72B weights cannot be downloaded here, but every path a user's first real run
takes (sharded safetensors loaded under ``zero.Init``, bf16 partitions, a 152k-row vocabulary, the
released key names that transformers 5 renames on load) can be exercised with random weights of the
released shapes. The writer never holds the model: it builds it on the meta device for names and
shapes, then draws one tensor at a time and keeps at most one shard in memory (peak RSS ~ one shard).

Layout = the released one: ``model-0000N-of-0000M.safetensors`` (each ≤ ``--max-shard-size``) plus
``model.safetensors.index.json``, the released key names (``model.layers.*``, ``visual.*``,
``lm_head.weight``), ``config.json``, and the real Qwen2.5 tokenizer + image-processor files.

Values follow transformers' init (normal, std = ``initializer_range`` 0.02; norms 1, biases 0), so
bf16 activations stay finite through 28-80 layers. Each tensor is seeded from (seed, name): the
same folder comes out whatever the shard size or order.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from jrm_dist.export import parse_size
from jrm_dist.partitioned_load import _NATIVE_TO_RELEASED

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def released_name(native: str) -> str:
    """transformers 5 module name -> released checkpoint key (what transformers renames back on load)."""
    for a, b in _NATIVE_TO_RELEASED:
        if native.startswith(a):
            return b + native[len(a):]
    return native


@dataclass(frozen=True)
class Spec:
    name: str  # released key name
    shape: tuple[int, ...]
    init: str  # normal | ones | zeros

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def load_config(path: str | os.PathLike):
    """A ``config.json`` (a file or a folder holding one) as a transformers config object."""
    import tempfile

    from transformers import AutoConfig

    p = Path(path)
    if p.is_dir():
        return AutoConfig.from_pretrained(str(p))
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(p, Path(d) / "config.json")
        return AutoConfig.from_pretrained(d)


def meta_model(cfg):
    """The transformers model on the meta device: names and shapes, no memory."""
    from jrm_dist.partitioned_load import model_class

    cls = model_class(cfg)  # imported outside the meta context (imports may build tensors)
    with torch.device("meta"):
        return cls._from_config(cfg)


def _init_rule(name: str, ndim: int) -> str:
    if name.endswith(".bias"):
        return "zeros"
    if ndim == 1 and ("norm" in name or ".ln_" in name):
        return "ones"
    return "normal"


def tensor_specs(cfg) -> list[Spec]:
    """Every tensor of the checkpoint, in the model's order, under its released name (tied weights once)."""
    model = meta_model(cfg)
    specs, seen = [], set()
    for native, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied embeddings are stored once
            continue
        seen.add(id(t))
        specs.append(Spec(released_name(native), tuple(t.shape), _init_rule(native, t.ndim)))
    return specs


def plan_shards(specs: list[Spec], dtype: torch.dtype, max_shard_bytes: int) -> list[list[Spec]]:
    """Greedy split in order, as transformers' ``save_pretrained`` does; a tensor bigger than the limit
    gets a shard of its own."""
    item = torch.empty((), dtype=dtype).element_size()
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        b = s.numel * item
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += b
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def index(shards: list[list[Spec]], dtype: torch.dtype) -> dict:
    item = torch.empty((), dtype=dtype).element_size()
    names = shard_names(len(shards))
    weight_map = {s.name: names[i] for i, sh in enumerate(shards) for s in sh}
    total = sum(s.numel * item for sh in shards for s in sh)
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def draw(spec: Spec, dtype: torch.dtype, seed: int, std: float) -> torch.Tensor:
    """One tensor, seeded from (seed, name) so the bytes do not depend on the sharding."""
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed ^ int(hashlib.sha256(spec.name.encode()).hexdigest()[:15], 16))
    out = torch.empty(spec.shape, dtype=dtype)
    # Draw in row blocks: the fp32 temporary stays small even for the 152k-row vocabulary.
    flat = out.view(spec.shape[0], -1) if out.ndim else out.view(1)
    rows = max(1, (64 << 20) // max(1, flat[0].numel() * 4))
    for i in range(0, flat.shape[0], rows):
        blk = flat[i:i + rows]
        blk.copy_(torch.randn(blk.shape, generator=g, dtype=torch.float32).mul_(std))
    return out


def _config_json(config: str | os.PathLike) -> dict:
    p = Path(config)
    return json.loads((p / "config.json" if p.is_dir() else p).read_text())


def write_checkpoint(config: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bf16", seed: int = 0,
                     max_shard_size: str | int = "4GB", tokenizer: bool = True, dry_run: bool = False,
                     progress: bool = True) -> dict:
    """Write (or with ``dry_run`` only plan) the checkpoint; returns a summary (params, bytes, shards, seconds).

    Dry run writes ``model.safetensors.index.json`` and ``shapes.json`` (name -> shape) only: the 72B layout
    can be checked without 145 GB of disk."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    t0 = time.time()
    cfg = load_config(config)
    tdtype = DTYPES[dtype]
    std = float(getattr(cfg.get_text_config(), "initializer_range", 0.02) or 0.02)
    specs = tensor_specs(cfg)
    shards = plan_shards(specs, tdtype, parse_size(max_shard_size))  # jrm-export's units (GB = 1e9)
    idx = index(shards, tdtype)
    out = Path(out_dir)
    if (out / "model.safetensors.index.json").exists() and not dry_run and (out / "DONE").exists():
        return {**json.loads((out / "DONE").read_text()), "reused": True}
    tmp = out if dry_run else out.with_name(out.name + ".partial")
    if tmp.exists() and not dry_run:
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    cj = _config_json(config)
    cj["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    (tmp / "config.json").write_text(json.dumps(cj, indent=2))
    summary = {"params": sum(s.numel for s in specs), "bytes": idx["metadata"]["total_size"], "tensors": len(specs),
               "shards": len(shards), "dtype": dtype, "seed": seed, "dry_run": dry_run}
    if dry_run:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))
        (tmp / "shapes.json").write_text(json.dumps({s.name: list(s.shape) for s in specs}, indent=0))
        summary["seconds"] = round(time.time() - t0, 1)
        return summary
    names = shard_names(len(shards))
    bar = tqdm(total=summary["bytes"], unit="B", unit_scale=True, desc="random weights", disable=not progress,
               file=sys.stderr)
    for fname, sh in zip(names, shards):
        tensors = {}
        for s in sh:
            tensors[s.name] = draw(s, tdtype, seed, std)
            bar.update(tensors[s.name].numel() * tensors[s.name].element_size())
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors  # one shard in memory at a time
    bar.close()
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))
    if tokenizer:
        from jrm_dist.tokenizer import write_tokenizer

        write_tokenizer(tmp, image_processor=True)
    summary["seconds"] = round(time.time() - t0, 1)
    (tmp / "DONE").write_text(json.dumps(summary))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return summary


def main(argv: list[str] | None = None) -> int:
    from importlib.resources import files

    ap = argparse.ArgumentParser(
        description="Write a released-layout Qwen2.5-VL checkpoint with random weights (real shapes, real "
                    "tokenizer) without holding the model: rehearse a 7B/72B run with no download.")
    ap.add_argument("--config", default="7b",
                    help="7b, 72b (the released configs shipped in jrm_dist/model_configs) or a config.json path")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", default="4GB")
    ap.add_argument("--dry-run", action="store_true", help="write only the index and shapes.json (no weights)")
    ap.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer / image-processor files")
    a = ap.parse_args(argv)
    config = a.config
    if config.lower() in ("7b", "72b"):
        config = str(files("jrm_dist") / "model_configs" / f"qwen2_5_vl_{config.lower()}.json")
    if not Path(config).exists():
        ap.error(f"--config {config}: no such file or folder")
    try:
        s = write_checkpoint(config, a.out, a.dtype, a.seed, a.max_shard_size, tokenizer=not a.no_tokenizer,
                             dry_run=a.dry_run)
    except ValueError as e:
        print(f"jrm-make-checkpoint: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
