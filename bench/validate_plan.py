"""Check jrm-plan's arithmetic against what can be measured on this CPU machine, in one run.

    python bench/validate_plan.py [--quick | --full] [--out bench/VALIDATION.md] [--workdir DIR]

1. Model states vs DeepSpeed's own estimator (``estimate_zero3_model_states_mem_needs_all_live``'s numbers:
   ``model_to_params`` of the built tiny and mid-size models, the 7B/72B counts of the model built on the meta
   device, through ``estimate_zero3_model_states_mem_needs``): ZeRO-3 without offload, with optimizer offload, with parameter offload.
2. Per-rank memory of a real ZeRO-3 run of our trainer (``jrm_dist.train.Trainer``, 2 CPU ranks over gloo,
   one optimizer step) measured by walking DeepSpeed's engine: parameter partitions (+ persistent params),
   the gradient partition, fp32 master partitions and Adam states — vs the planner's model states.
3. Activations: the bytes autograd keeps for backward (saved-tensor hooks, parameters excluded; with gradient
   checkpointing the profiler's net forward allocation) on the tiny and mid-size models, fp32 and bf16, vs the
   planner's activation formula for the same batch.

Every row prints ``RESULT {json}`` (bench/README.md convention) with ours = planner, baseline = measured or
DeepSpeed, ratio = ours / baseline; agreement means |ratio - 1| <= 0.15.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from jrm_dist import plan as P  # noqa: E402
from jrm_dist.config import load_config  # noqa: E402

TOL = 0.15
SIZES = {"tiny": (64, 2), "mid": (512, 8)}  # text hidden, layers (vision tower as built by backbones.py)


def _backbone(workdir: Path, name: str) -> Path:
    from jrm_dist.backbones import build_tiny_backbone

    hidden, layers = SIZES[name]
    return build_tiny_backbone(workdir / f"backbone-{name}", hidden=hidden, layers=layers)


def _tiny_cfg(model_dir: Path, *extra: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"model.name={model_dir}", *extra])


def _arch(model_dir: Path) -> P.Arch:
    return P.read_arch(json.loads((model_dir / "config.json").read_text()), str(model_dir / "config.json"))


def row(section: str, case: str, ours: float, baseline: float, unit: str = "MiB") -> dict:
    r = {"name": f"plan/{section}/{case}", "ours": ours, "baseline": baseline,
         "ratio": ours / baseline if baseline else float("nan"), "unit": unit}
    r["ok"] = abs(r["ratio"] - 1) <= TOL
    print("RESULT " + json.dumps(r), flush=True)
    return r


# ---------------------------------------------------------------------------------------- 1. DeepSpeed estimator
def _planner_gpu_states(arch: P.Arch, cfg, n: int) -> float:
    """Planner model states + the gathered largest module in 16-bit param + grad (DeepSpeed's 4·largest)."""
    inv = P.inventory(arch, cfg.model.head_hidden)
    ms = P.model_states(cfg, inv, arch, n)
    return ms["params"] + ms["grads"] + ms["optimizer"] + (ms["param_bytes"] + ms["grad_bytes"]) * P.largest_module(inv)


def deepspeed_estimator(workdir: Path, quick: bool) -> list[dict]:
    # estimate_zero3_model_states_mem_needs_all_live(model) only prints; it is model_to_params + this function
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from jrm_dist.model import RewardHead

    rows = []
    modes = {"no-offload": (False, False, "none", "none"), "offload-opt": (True, False, "cpu", "none"),
             "offload-opt+param": (True, True, "cpu", "cpu")}
    models = ["tiny", "7b"] if quick else ["tiny", "mid", "7b", "72b"]
    for name in models:
        gpus = 8
        nodes = 4 if name == "72b" else 1
        if name in SIZES:
            d = _backbone(workdir, name)
            arch = _arch(d)
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(d)
            model.reward_head = RewardHead(arch.hidden, 64)  # the planner counts the JRM head too
            head = 64
        else:
            src = ROOT / "jrm_dist" / "model_configs" / f"qwen2_5_vl_{name}.json"
            arch = P.read_arch(json.loads(src.read_text()), str(src))
            total, largest = P.hf_meta_counts(json.loads(src.read_text()))
            head = 1024
            total += head * arch.hidden + head + 2 * head + 2 + arch.hidden  # reward head + reward-token embedding
        for mode, (off, off_p, zo, zp) in modes.items():
            cfg = load_config(None, ["model.precision=bf16", f"model.head_hidden={head}", "zero.stage=3",
                                     "zero.stage3_param_persistence_threshold=0",  # the estimator ignores it
                                     f"zero.offload_optimizer={zo}", f"zero.offload_param={zp}"])
            if name in SIZES:  # what estimate_zero3_model_states_mem_needs_all_live(model) derives and prints
                total, largest = model_to_params(model)
            _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=off,
                                                                 cpu_offload_params=off_p)
            ours = _planner_gpu_states(arch, cfg, gpus * nodes)
            rows.append(row("deepspeed_estimator", f"{name}-{nodes}x{gpus}-{mode}", ours / 2**20, ds_gpu / 2**20))
    return rows


# ------------------------------------------------------------------------------------ 2. measured ZeRO-3 per rank
def measure_engine(engine) -> dict:
    """Bytes this rank holds for parameters / gradients / optimizer (each storage counted once)."""
    opt = engine.optimizer
    seen: set[int] = set()

    def nb(t) -> int:
        if t is None or not torch.is_tensor(t):
            return 0
        st = t.untyped_storage()
        if st.nbytes() == 0 or st.data_ptr() in seen:
            return 0
        seen.add(st.data_ptr())
        return st.nbytes()

    params = sum(nb(p.ds_tensor) for p in engine.module.parameters())
    params += sum(nb(p.data) for p in engine.module.parameters() if getattr(p, "ds_persist", False))
    grads = nb(getattr(opt, "grad_partitions_flat_buffer", None))
    master = sum(nb(t) for t in getattr(opt, "fp32_partitioned_groups_flat", []))  # 0 when shared with params
    inner = getattr(opt, "optimizer", opt)
    states = sum(nb(v) for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim > 0)
    buckets = sum(nb(getattr(b, "buffer", None)) for b in getattr(opt, "ipg_buckets", {}).values())
    return {"params": params, "grads": grads, "optimizer": master + states, "reduce_bucket": buckets}


def worker(args) -> None:
    """One rank: for each case build our trainer, take one optimizer step (Adam states exist after it),
    measure, tear down. All cases share one launch (start-up is most of a tiny run's time)."""
    import gc

    from jrm_dist.config import load_config
    from jrm_dist.train import Trainer

    cases = json.loads(Path(args.cases).read_text())
    results = {}
    for case in cases:
        cfg = load_config(args.config, case["overrides"])
        tr = Trainer(cfg, resume="none")
        tr.build()
        if tr.train_step() is None:
            raise SystemExit(f"{case['name']}: the loader gave no batch")
        meas = measure_engine(tr.engine)
        gathered = [None] * tr.world
        torch.distributed.all_gather_object(gathered, {**meas, "rank": tr.rank})
        results[case["name"]] = gathered
        tr.tracker.close(timeout=5.0, status="FINISHED")
        del tr
        gc.collect()
        torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        Path(args.result).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def _shards(workdir: Path) -> Path:
    out = workdir / "shards"
    if not (out / "manifest.json").exists():
        from data_prep.cli import main as prep

        prep(["synthetic", "--out", str(out), "--groups", "32", "--seed", "0", "--quiet"])
    return out


def measured_zero3(workdir: Path, quick: bool, full: bool) -> list[dict]:
    shards = _shards(workdir)
    specs = [("tiny", "fp32", 0)] + ([] if quick else [("mid", "fp32", 0), ("mid", "fp32", 100_000)])
    if full:
        specs += [("mid", "bf16", 0)]  # bf16 on CPU is slow (~2 min): --full only
    cases = []
    for name, prec, thresh in specs:
        d = _backbone(workdir, name)
        cases.append({"name": f"{name}-{prec}-persist{thresh}", "dir": str(d), "overrides": [
            f"model.name={d}", f"data.train_shards={shards}", "data.eval_shards=", f"model.precision={prec}",
            f"zero.stage3_param_persistence_threshold={thresh}", "tracking.enabled=false",
            f"train.output_dir={workdir / f'run-{name}-{prec}-{thresh}'}", "train.max_steps=1"]})
    spec_file, result = workdir / "zero3-cases.json", workdir / "zero3-measured.json"
    spec_file.write_text(json.dumps(cases))
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--worker", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--cases", str(spec_file), "--result", str(result)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if p.returncode != 0 or not result.exists():
        print(p.stdout[-3000:], p.stderr[-6000:], sep="\n")
        raise SystemExit(f"the 2-rank ZeRO-3 runs failed (exit {p.returncode})")
    print(f"  (2-rank ZeRO-3 runs: {time.time() - t0:.0f} s)", flush=True)
    measured = json.loads(result.read_text())
    rows = []
    for case in cases:
        d = Path(case["dir"])
        cfg = _tiny_cfg(d, *case["overrides"][1:])
        arch = _grown(_arch(d), d)  # the trainer adds the reward token: the embedding/LM head may grow a row
        ms = P.model_states(cfg, P.inventory(arch, cfg.model.head_hidden), arch, 2)
        planned = ms["params"] + ms["grads"] + ms["optimizer"]
        for r in measured[case["name"]]:
            got = r["params"] + r["grads"] + r["optimizer"]
            rows.append(row("zero3_measured", f"{case['name']}-rank{r['rank']}", planned / 2**20, got / 2**20))
            print(f"  {case['name']} rank {r['rank']}: measured params {r['params'] / 2**20:.3f}, grads "
                  f"{r['grads'] / 2**20:.3f}, optimizer {r['optimizer'] / 2**20:.3f} MiB; planned params "
                  f"{ms['params'] / 2**20:.3f}, grads {ms['grads'] / 2**20:.3f}, optimizer "
                  f"{ms['optimizer'] / 2**20:.3f} MiB", flush=True)
    return rows


def _grown(arch: P.Arch, model_dir: Path) -> P.Arch:
    """The architecture after RewardProcessor/add_reward_token: vocab = max(vocab, reward_token_id + 1)."""
    from dataclasses import replace

    from jrm_dist.processing import RewardProcessor

    rid = RewardProcessor.from_pretrained(str(model_dir)).reward_token_id
    return replace(arch, vocab=max(arch.vocab, rid + 1))


# ------------------------------------------------------------------------------------------------- 3. activations
def measure_activations(model, batch, ckpt: bool) -> int:
    """Bytes kept for backward by one forward. Without checkpointing: every tensor autograd saves (each storage
    once, parameters excluded). With it, the saved-tensor hooks no longer see the kept layer inputs, so the
    profiler's net CPU allocation over the forward is used."""
    if ckpt:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model(batch)
        kept = sum(e.self_cpu_memory_usage for e in prof.events())
        del out
        return kept
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
    del out
    return sum(seen.values())


def activations(workdir: Path, quick: bool) -> list[dict]:
    from data_prep.synthetic import make_group
    from jrm_dist.data.collate import Collator, encode_group
    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import RewardProcessor

    rows = []
    cases = [("tiny", "fp32", False), ("mid", "fp32", False), ("mid", "bf16", False), ("mid", "fp32", True)]
    if quick:
        cases = [cases[0]]
    for name, prec, ckpt in cases:
        d = _backbone(workdir, name)
        proc = RewardProcessor.from_pretrained(str(d))
        torch.manual_seed(0)
        dt = torch.bfloat16 if prec == "bf16" else torch.float32
        model = JointRewardModel.from_backbone(str(d), proc.reward_token_id, head_hidden=64, dtype=dt,
                                               attn_implementation="sdpa", lm_ce="auto").train()
        if ckpt:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        groups = [encode_group(proc, *make_group(0, i, k=2), use_rationale=True) for i in range(4)]
        batch = Collator(proc)(groups)
        model(batch)  # warm-up (lazy buffers, rotary caches)
        got = measure_activations(model, batch, ckpt)
        B, T = batch["input_ids"].shape
        arch = _arch(d)
        patches = batch["pixel_values"].shape[0]
        img_tokens = 4  # 56x56 synthetic images at max_pixels 3136 -> 2x2 merged tokens
        labelled = int((batch["labels"][:, 1:] != -100).sum())
        w = P.Workload(groups=4, candidates=2, seq_len=T, images_per_seq=patches // (B * img_tokens * 4),
                       image_tokens=img_tokens, labelled=labelled // B)
        cfg = _tiny_cfg(d, f"model.precision={prec}", f"model.gradient_checkpointing={str(ckpt).lower()}")
        act = P.activations(cfg, arch, w, 2 if prec == "bf16" else 4)
        planned = act["text"] + act["vision"]
        if ckpt:  # the planner's figure includes one layer being recomputed during backward: not in a forward
            planned -= P.text_layer_act(arch, 4, "sdpa", T) * act["tokens"] + \
                P.vision_block_act(arch, 4) * act["patches"]
        rows.append(row("activations", f"{name}-{prec}-{'ckpt' if ckpt else 'full'}-B{B}xT{T}",
                        planned / 2**20, got / 2**20))
    return rows


# -------------------------------------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    lines = ["| check | planner (MiB) | measured / DeepSpeed (MiB) | ratio | within 15% |", "|---|---:|---:|---:|:-:|"]
    for r in rows:
        lines.append(f"| {r['name'].removeprefix('plan/')} | {r['ours']:.3f} | {r['baseline']:.3f} | "
                     f"{r['ratio']:.3f} | {'yes' if r['ok'] else '**no**'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only (the unit tests use this)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--workdir", default=None, help="reuse backbones/shards across runs")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--cases", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help="also the slow cases (bf16 ZeRO-3 run on CPU)")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="jrm-validate-")
        workdir = Path(tmp.name)
    t0 = time.time()
    rows = deepspeed_estimator(workdir, args.quick)
    rows += activations(workdir, args.quick)
    rows += measured_zero3(workdir, args.quick, args.full)
    md = table(rows)
    print("\n" + md)
    bad = [r["name"] for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} checks within {TOL:.0%} ({time.time() - t0:.0f} s)")
    if args.out:
        Path(args.out).write_text("# jrm-plan validation\n\n" + md + "\n")
    if tmp:
        tmp.cleanup()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
