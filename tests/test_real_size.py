"""Real-size paths at tiny size: the released-layout random checkpoint writer (7B/72B layout, dry run checked
against the meta-built model and jrm-plan), loading straight into ZeRO-3 partitions (bit-equal to plain
transformers), and LoRA checkpoints that re-read their frozen base (resume bit-exact, export streamed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_launch import ROOT, base_overrides, env_for, free_port, spawn, steps


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory):
    from jrm_dist.backbones import tiny_config
    from jrm_dist.tokenizer import build_qwen25_tokenizer

    d = tmp_path_factory.mktemp("cfg")
    tiny_config(build_qwen25_tokenizer(), hidden=64, layers=2).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def released_tiny(tiny_config_dir, tmp_path_factory):
    """A sharded released-layout bf16 checkpoint of a tiny-width Qwen2.5-VL with the real vocabulary."""
    from jrm_dist.random_checkpoint import write_checkpoint

    out = tmp_path_factory.mktemp("rel") / "ckpt"
    summary = write_checkpoint(tiny_config_dir, out, max_shard_size="8MB", progress=False)
    return out, summary


def test_writer_uses_the_released_layout_and_plain_transformers_loads_it(released_tiny, tiny_config_dir):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from jrm_dist.random_checkpoint import load_config, meta_model

    out, summary = released_tiny
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert summary["shards"] == len(files) > 1
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    big = max(v for k, v in json.loads((out / "DONE").read_text()).items() if k == "bytes")
    assert big > 8 * 2**20  # the limit really split the checkpoint
    keys = set(index["weight_map"])
    assert any(k.startswith("model.layers.") for k in keys) and any(k.startswith("visual.") for k in keys)
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in keys)  # released names
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.bfloat16)
    meta = meta_model(load_config(tiny_config_dir))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    sd = model.state_dict()
    w = sd["model.language_model.layers.0.mlp.up_proj.weight"].float()
    assert w.dtype == torch.float32 and 0.018 < w.std().item() < 0.022 and abs(w.mean().item()) < 2e-3
    assert torch.equal(sd["model.language_model.norm.weight"], torch.ones_like(sd["model.language_model.norm.weight"]))
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|image_pad|>") == 151655
    assert (out / "preprocessor_config.json").exists()


def test_writer_bytes_do_not_depend_on_the_sharding(released_tiny, tiny_config_dir, tmp_path):
    from safetensors.torch import load_file

    from jrm_dist.random_checkpoint import write_checkpoint

    out, _ = released_tiny
    write_checkpoint(tiny_config_dir, tmp_path / "one", max_shard_size="10GB", tokenizer=False, progress=False)
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    many = {}
    for f in sorted(out.glob("model-*.safetensors")):
        many.update(load_file(str(f)))
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_72b_dry_run_matches_the_meta_model_and_jrm_plan(tmp_path):
    from importlib.resources import files

    from jrm_dist.plan import hf_meta_counts, inventory, load_arch, param_count
    from jrm_dist.random_checkpoint import load_config, meta_model, released_name, write_checkpoint

    cfg_path = Path(str(files("jrm_dist") / "model_configs" / "qwen2_5_vl_72b.json"))
    s = write_checkpoint(cfg_path, tmp_path / "72b", dry_run=True, progress=False)
    shapes = json.loads((tmp_path / "72b" / "shapes.json").read_text())
    index = json.loads((tmp_path / "72b" / "model.safetensors.index.json").read_text())
    assert not list((tmp_path / "72b").glob("*.safetensors"))  # nothing but the plan
    meta = meta_model(load_config(cfg_path))
    assert shapes == {released_name(k): list(v.shape) for k, v in meta.state_dict().items()}
    assert set(index["weight_map"]) == set(shapes)
    assert index["metadata"]["total_size"] == 2 * s["params"]
    assert s["params"] == hf_meta_counts(json.loads(cfg_path.read_text()))[0]
    inv = inventory(load_arch(str(cfg_path), str(cfg_path)), 1024)
    assert s["params"] == param_count(inv) - param_count(inv, {"head"})  # jrm-plan's count without the JRM head
    assert 73.0e9 < s["params"] < 73.7e9 and 36 <= s["shards"] <= 40


_COMPARE = r"""
import os, sys, torch
from jrm_dist.engine import init_distributed
init_distributed()
import deepspeed
from transformers import AutoModelForImageTextToText
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from jrm_dist.partitioned_load import load_backbone_partitioned
ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": int(sys.argv[2])}}
keep = HfDeepSpeedConfig(ds)
m = load_backbone_partitioned(sys.argv[1], torch.bfloat16, "sdpa")
local = sum(p.ds_tensor.numel() for p in m.parameters())
unset_hf_deepspeed_config()
ref = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
rp, rb = dict(ref.named_parameters()), dict(ref.named_buffers())
diff = []
for n, p in m.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        if not torch.equal(p.data, rp[n].data):
            diff.append(n)
diff += [n for n, b in m.named_buffers() if not torch.equal(b, rb[n])]
total = sum(p.numel() for p in ref.parameters())
print("RESULT", len(diff), diff[:3], local, total, flush=True)
"""


@pytest.mark.launch
@pytest.mark.timeout(300)
@pytest.mark.parametrize("persist", [0, 100000])
def test_partitioned_load_equals_plain_transformers(released_tiny, tmp_path, persist):
    """2 ranks: each copies its own partition from the mmapped shards; gathered, every parameter and buffer
    equals transformers' own load of the released-layout folder, bit for bit."""
    out, _ = released_tiny
    script = tmp_path / "cmp.py"
    script.write_text(_COMPARE)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(persist)], cwd=ROOT,
                              env=env_for(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=280)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    results = [line.split(maxsplit=1)[1] for log in logs for line in log.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2
    for r in results:
        assert r.startswith("0 []"), r
    if persist == 0:  # really partitioned: each rank holds half (+ padding)
        local, total = (int(x) for x in results[0].split()[-2:])
        assert local <= total // 2 + 200


@pytest.mark.launch
@pytest.mark.timeout(600)
def test_lora_checkpoint_rereads_the_frozen_base_and_resumes_bit_exactly(tiny_backbone, synthetic_shards,
                                                                               tmp_path):
    """A LoRA checkpoint holds only what trains (the base is re-read from model.name, checked by fingerprint);
    kill -9 after the step-2 save, resume: steps 3-4 equal an uninterrupted run bit for bit, LoRA dropout on
    (its masks come from the restored RNG stream; the resumed data iterator must not draw from it: it did,
    and step 3 was 2.35306 instead of 2.35228)."""
    extra = {"model.lora.r": 4, "model.lora.dropout": 0.1, "tracking.enabled": "false", "data.eval_shards": "",
             "train.export": "false", "optim.lr": "1e-3"}
    ref = tmp_path / "ref"
    r = spawn(base_overrides(tiny_backbone, synthetic_shards, ref, steps=4, **extra))
    assert r.codes == [0, 0], r.log
    out = tmp_path / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=4, **extra)
    a = spawn(ov, faults="kill@3:0,kill@3:1")
    assert a.codes == [-9, -9], a.log
    state = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["frozen_from"]["path"] == str(Path(tiny_backbone).resolve())
    ds = out / "checkpoints" / "step_00000002" / "ds"
    ckpt_bytes = sum(f.stat().st_size for f in ds.rglob("*") if f.is_file())
    base_bytes = sum(f.stat().st_size for f in Path(tiny_backbone).glob("*.safetensors"))
    assert ckpt_bytes < base_bytes / 2, (ckpt_bytes, base_bytes)  # the frozen base is not in it
    b = spawn(ov)
    assert b.codes == [0, 0], b.log
    got, want = steps(out), steps(ref)
    assert sorted(got) == [1, 2, 3, 4]
    for s in (1, 2, 3, 4):
        for k in ("loss/total", "loss/rank", "loss/lm", "grad_norm"):
            assert got[s][k] == want[s][k], (s, k, got[s][k], want[s][k])
    # a resume on other base weights is refused, naming both folders
    other = tmp_path / "other_base"
    other.mkdir()
    for f in Path(tiny_backbone).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    sd = load_file(str(other / "model.safetensors"))
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}  # same shapes, other weights
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    c = spawn(base_overrides(str(other), synthetic_shards, out, steps=5, **extra))
    assert c.codes != [0, 0] and "holds different weights" in c.log, c.log


@pytest.mark.launch
def test_lora_bf16_with_parameters_offloaded_to_nvme_trains_like_in_memory(synthetic_shards, tmp_path):
    """ZeRO-Infinity (``zero.offload_param=nvme``, DeepSpeed's async-I/O op) is how 7B fits this machine and 72B
    fewer GPUs. It failed at start-up: the head's own ``zero.Init`` made a second swapper that the first
    gather could not serve. With the released vocabulary (152064 x 64: its partitions pass DeepSpeed's 1 MiB
    floor for swapping) the same 3 LoRA steps with partitions on disk give the in-memory run's losses; a
    swap buffer smaller than the largest partition is refused up front, naming the tensor and the size needed."""
    from jrm_dist.backbones import build_tiny_backbone

    bb = str(build_tiny_backbone(tmp_path / "backbone", tokenizer="real"))
    common = {"model.precision": "bf16", "zero.stage": 3, "model.lora.r": 4, "train.save_every": 0,
              "tracking.enabled": "false", "train.export": "false", "data.eval_shards": ""}
    ref = spawn(base_overrides(bb, synthetic_shards, tmp_path / "mem", steps=3, **common))
    assert ref.codes == [0, 0], ref.log
    swap = tmp_path / "nvme"
    nvme = {"zero.offload_param": "nvme", "zero.nvme_path": str(swap), "zero.nvme_buffer_count": 4}
    small = spawn(base_overrides(bb, synthetic_shards, tmp_path / "small", steps=3, **common, **nvme,
                                 **{"zero.nvme_buffer_size": 4_000_000}))
    assert small.codes == [2, 2], small.log
    assert "zero.nvme_buffer_size=4000000 elements is smaller than the largest parameter partition" in small.log
    assert "has 9732096 elements, 4866048 per rank on 2 ranks" in small.log  # a 152064 x 64 vocabulary matrix
    assert "zero.nvme_buffer_size>=4866048" in small.log  # ceil(152064 * 64 / 2)

    seen = set()
    off = spawn(base_overrides(bb, synthetic_shards, tmp_path / "off", steps=3, **common, **nvme,
                               **{"zero.nvme_buffer_size": 5_000_000}), timeout=600,
                poll=lambda: seen.update(p.name for p in swap.rglob("*.swp")))
    assert off.codes == [0, 0], off.log
    assert seen, "no parameter partition was swapped to disk"
    a, b = steps(tmp_path / "mem"), steps(tmp_path / "off")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert b[s]["loss/total"] == a[s]["loss/total"], (s, a[s], b[s])
