"""``jrm-export --checkpoint RUN_DIR[/checkpoints/step_N] --out HF_DIR [--dtype bf16]``

Consolidates a ZeRO (2 or 3) training checkpoint into a Hugging Face-style directory that
``JointRewardModel.from_pretrained(HF_DIR)`` (and transformers, for the backbone alone) loads:

    config.json, model-0000i-of-0000N.safetensors + model.safetensors.index.json   backbone
    reward_head.safetensors (fp32), jrm_config.json                                 reward head
    tokenizer files, preprocessor_config.json                                       processor

Memory: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)`` holds each rank's flat
fp32 partition once and hands out lazy tensors; we materialise one tensor at a time and write a
shard as soon as it reaches ``--max-shard-size``, so peak memory is the fp32 partitions plus one
shard — never the whole model twice. LoRA adapters (model.lora.r > 0) are merged into their base weights.
The vocabulary's ``<|reward|>`` row gets the trained reward-token embedding (``model.vocab_with_reward_row``),
so transformers alone + the head's MLP reproduce ``JointRewardModel.score``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run dir (→ its newest complete checkpoint) or a ``checkpoints/step_N`` dir."""
    from jrm_dist import checkpoint as ck

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint {p}: does not exist")
    if ck.is_complete(p):
        return p
    found = ck.find_resume(p, "auto") if (p / "checkpoints").is_dir() else None
    if found is None:
        raise FileNotFoundError(f"--checkpoint {p}: neither a complete checkpoint (step_N with {ck.COMPLETE}) nor a "
                                f"run directory holding one under checkpoints/")
    return found


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", s, re.I)
    if not m:
        raise ValueError(f"--max-shard-size {s!r}: expected e.g. 5GB, 500MB, 1000000")
    mult = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def _merge_lora(sd: dict, scale: float) -> dict:
    """``base_layer.weight + scale * B @ A`` for every LoRA-wrapped Linear; adapters dropped, names restored."""
    out = {}
    lora = {}
    for k, v in sd.items():
        m = re.match(r"^(.*)\.lora_([AB])\.[^.]+\.weight$", k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            out[k] = v
    merged = {}
    for k, v in out.items():
        m = re.match(r"^(.*)\.base_layer\.(weight|bias)$", k)
        if not m:
            merged[k] = v
            continue
        prefix, what = m.groups()
        if what == "weight" and prefix in lora:
            ab = lora[prefix]
            merged[f"{prefix}.weight"] = _LoraMerged(v, ab["A"], ab["B"], scale)
        else:
            merged[f"{prefix}.{what}"] = v
    return merged


class _SourceTensor:
    """A frozen parameter, read from the run's base checkpoint (``trainer_state["frozen_from"]``) when its shard
    is written: checkpoints of runs with frozen parts (LoRA) do not hold them."""

    def __init__(self, file: Path, key: str, dtype: torch.dtype, reward_row: int | None = None):
        self.file, self.key, self.dtype, self.reward_row = file, key, dtype, reward_row

    def contiguous(self):
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as f:
            t = f.get_tensor(self.key).to(self.dtype)  # as the run held it
        if self.reward_row is not None:  # what model.add_reward_token did to the vocabulary matrices at build
            rid = self.reward_row
            if t.shape[0] <= rid:
                t = torch.cat([t, t.new_zeros(rid + 1 - t.shape[0], *t.shape[1:])])
            t[rid] = t[:rid].float().mean(0).to(t.dtype)
        return t.float()


def _with_frozen_from_source(backbone: dict, frozen_from: dict, src: Path, vocab_names: set[str],
                             reward_token_id: int) -> dict:
    """Complete the trained tensors with the frozen ones of the base checkpoint, under the names the model had
    in training (a LoRA-wrapped Linear's base weight is ``<prefix>.base_layer.weight``)."""
    from jrm_dist import checkpoint as ck
    from jrm_dist.partitioned_load import checkpoint_keys, native_name

    base = Path(frozen_from["path"])
    if not base.is_dir() or ck.source_fingerprint(base) != frozen_from["fingerprint"]:
        raise ValueError(f"{src}: its frozen parameters are those of {base} (fingerprint "
                         f"{frozen_from['fingerprint'][:12]}), which is missing or changed; the export needs that folder")
    lora_prefixes = {m.group(1) for k in backbone if (m := re.match(r"^(.*)\.lora_[AB]\.[^.]+\.weight$", k))}
    out = dict(backbone)
    for key, file in checkpoint_keys(base).items():
        name = native_name(key)
        prefix, _, what = name.rpartition(".")
        if prefix in lora_prefixes:
            name = f"{prefix}.base_layer.{what}"
        if name not in out:  # a trained copy (full fine-tuning of that tensor) wins
            out[name] = _SourceTensor(file, key, getattr(torch, frozen_from.get("dtype", "float32")),
                                      reward_token_id if name in vocab_names else None)
    return out


class _LoraMerged:
    """Lazy merged LoRA weight (materialised only when its shard is written)."""

    def __init__(self, base, a, b, scale):
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def contiguous(self):
        w = self.base.contiguous().float()
        return w + self.scale * (self.b.contiguous().float() @ self.a.contiguous().float())


def _input_embedding_name(jcfg: dict, backbone: dict, src: Path) -> str:
    """The vocabulary matrix's name: recorded in jrm_config.json; older checkpoints: the one text
    ``embed_tokens.weight`` outside the vision tower."""
    name = jcfg.get("input_embedding")
    if name is None:
        found = [k for k in backbone if k.endswith("embed_tokens.weight") and "visual" not in k]
        if len(found) != 1:
            raise ValueError(f"{src}: cannot tell the input-embedding matrix (jrm_config.json has no "
                             f"'input_embedding'; candidates: {found})")
        name = found[0]
    if name not in backbone:
        raise ValueError(f"{src}: input embedding {name!r} (jrm_config.json 'input_embedding') is not in the "
                         "DeepSpeed state")
    return name


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "fp32",
                      max_shard_size: str | int = "5GB") -> Path:
    """Write the HF directory (atomically: ``out_dir.tmp`` then rename). Returns ``out_dir``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    from jrm_dist import checkpoint as ck
    from jrm_dist.model import HEAD_WEIGHTS, JRM_CONFIG, vocab_with_reward_row

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    src = resolve_checkpoint(checkpoint)
    hf = src / "hf"
    if not (hf / "config.json").exists() or not (hf / JRM_CONFIG).exists():
        raise FileNotFoundError(f"{hf}: backbone config / {JRM_CONFIG} missing (checkpoint not written by jrm-train)")
    state = ck.read_state(src)
    limit = parse_size(max_shard_size)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(src), tag=ck.DS_TAG, lazy_mode=True)
    head = {k[len("reward_head."):]: v for k, v in lazy.items() if k.startswith("reward_head.")}
    backbone = {k[len("backbone."):]: v for k, v in lazy.items() if k.startswith("backbone.")}
    other = sorted(set(lazy) - {f"reward_head.{k}" for k in head} - {f"backbone.{k}" for k in backbone})
    if other:
        raise ValueError(f"{src}: unexpected parameters outside backbone/reward_head: {other[:5]}")
    if not head:
        raise ValueError(f"{src}: no reward_head parameters in the DeepSpeed state")
    jcfg_in = json.loads((hf / JRM_CONFIG).read_text())
    if state.get("frozen_from"):
        vocab = {jcfg_in.get("input_embedding", ""), "lm_head.weight"}
        backbone = _with_frozen_from_source(backbone, state["frozen_from"], src, vocab, int(jcfg_in["reward_token_id"]))
    if state.get("lora"):
        backbone = _merge_lora(backbone, float(state["lora_alpha"]) / float(state["lora_r"]))
    vocab_name = _input_embedding_name(jcfg_in, backbone, src)
    if "token.weight" not in head:
        raise ValueError(f"{src}: no reward_head.token.weight (the <|reward|> embedding) in the DeepSpeed state")
    vocab_id = id(backbone[vocab_name])  # tied weights are one lazy tensor, written under the first name

    tdtype = DTYPES[dtype]
    shards: list[list[str]] = []
    written: dict[int, str] = {}
    cur: dict[str, torch.Tensor] = {}
    cur_bytes = 0
    total = 0

    def flush():
        nonlocal cur, cur_bytes
        if cur:
            save_file(cur, str(tmp / f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(cur))
            cur, cur_bytes = {}, 0

    for name in sorted(backbone):
        lz = backbone[name]
        if id(lz) in written:  # tied weights (DeepSpeed shares one tensor): stored once, re-tied on load
            continue
        written[id(lz)] = name
        t = lz.contiguous()
        if id(lz) == vocab_id:
            t = vocab_with_reward_row(t, head["token.weight"].contiguous(), int(jcfg_in["reward_token_id"]))
        t = t.to(tdtype) if t.is_floating_point() else t
        nbytes = t.numel() * t.element_size()
        if cur and cur_bytes + nbytes > limit:
            flush()
        cur[name] = t.contiguous()
        cur_bytes += nbytes
        total += nbytes
    flush()
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / f"shard-{i:05d}.safetensors", tmp / final)
        weight_map.update({k: final for k in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    save_file({k: v.contiguous().float() for k, v in head.items()}, str(tmp / HEAD_WEIGHTS))
    for f in hf.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["dtype"] = _DTYPE_NAMES[dtype]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    jcfg = json.loads((tmp / JRM_CONFIG).read_text())
    jcfg["exported_from"] = {"checkpoint": str(src.resolve()), "step": state["step"], "dtype": dtype,
                             "mlflow_run_id": state.get("mlflow_run_id")}
    (tmp / JRM_CONFIG).write_text(json.dumps(jcfg, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("exported %s (step %d) -> %s: %d shard(s), %.1f MB backbone (%s)", src, state["step"], out, n,
             total / 1e6, dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jrm-export", description="Consolidate a jrm-train ZeRO checkpoint into an "
                                 "HF-format directory (safetensors shards + reward head + processor)")
    ap.add_argument("--checkpoint", required=True, help="run dir (newest complete checkpoint) or checkpoints/step_N")
    ap.add_argument("--out", required=True, help="output directory (replaced atomically)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="backbone dtype (the head stays fp32)")
    ap.add_argument("--max-shard-size", default="5GB", help="safetensors shard size bound (default 5GB)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = export_checkpoint(a.checkpoint, a.out, a.dtype, a.max_shard_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"jrm-export: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
