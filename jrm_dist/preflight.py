"""``python -m jrm_dist.preflight --config CFG [dotted.overrides ...]``: cheap checks before an expensive launch.

The launchers run it on the first node before ``srun``/``torchrun``, so a typo in a path fails in seconds
with a message that names the key and the file, instead of after 32 GPUs have loaded 72B weights.
Checks: the config and overrides are valid; the train/eval shards resolve (manifest readable, every
local shard present, readable and a tar; with ``data.verify=true`` every train shard's sha256 matches); the backbone (``model.name``) is a local directory with a
config and weights, or already in the Hugging Face cache (nothing is downloaded at run time); the
output directory is writable and its file system has room for ``keep_last + 1`` checkpoints plus the
export (sizes estimated from the architecture); the requested devices exist.

Exit status 0 when every check passes, 2 otherwise (every problem is listed, not only the first).
``--print-output-dir`` prints the resolved ``train.output_dir`` on stdout (all messages go to stderr),
which the launchers use to find the trainer's REQUEUE marker.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
from pathlib import Path

from jrm_dist.config import ConfigError, JRMConfig, load_config

GIB = 1024 ** 3
# Bytes per trainable parameter of the optimizer state in a DeepSpeed checkpoint: fp32 master + Adam m, v;
# 8-bit Adam keeps m, v in 1 byte each (+ blockwise scales) next to the fp32 master.
OPTIM_BYTES = {"adamw": 12.0, "cpu_adam": 12.0, "adamw8bit": 4.0 + 2.0 + 8.0 / 256,
               "paged_adamw8bit": 4.0 + 2.0 + 8.0 / 256}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024 ** 2:.1f} MiB"


class Report:
    """Collects problems so one run lists all of them."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, msg: str) -> None:
        self.problems.append(msg)
        print(f"preflight: FAIL {msg}", file=sys.stderr)

    def ok(self, msg: str) -> None:
        print(f"preflight: ok   {msg}", file=sys.stderr)


def check_shards(key: str, spec: str, rep: Report, required: bool, verify: bool = False) -> None:
    """Resolve the shard list exactly as the loader will, then open every local shard's tar header;
    ``verify`` (data.verify): also every shard's sha256 against the manifest."""
    from jrm_dist.data.shards import resolve_shards, verify_shards

    if not spec:
        if required:
            rep.fail(f"{key} is empty: point it at a jrm-prep output folder or its manifest.json")
        return
    local = "://" not in spec and not spec.startswith("pipe:") and "{" not in spec and "::" not in spec
    if local and not os.path.exists(spec):
        rep.fail(f"{key}={spec!r}: does not exist (expected a jrm-prep output folder, its manifest.json, "
                 "or a shard pattern such as shards/shard-{000000..000099}.tar)")
        return
    try:
        shards = resolve_shards(spec)
    except Exception as e:  # the loader's own messages name the manifest and the field
        rep.fail(f"{key}={spec!r}: {type(e).__name__}: {e}")
        return
    bad = 0
    for s in shards:
        if "://" in s.url or s.url.startswith("pipe:"):
            continue  # remote shards: only the trainer's reader can tell
        try:
            if os.path.getsize(s.url) == 0:
                raise ValueError("empty file")
            if not tarfile.is_tarfile(s.url):  # opens it and parses the first header only
                raise ValueError("not a tar file")
        except (OSError, ValueError) as e:
            bad += 1
            if bad <= 5:
                rep.fail(f"{key}={spec!r}: shard {s.url}: {e}")
    if bad > 5:
        rep.fail(f"{key}={spec!r}: {bad - 5} more unreadable shards")
    if not bad and verify:
        problems = verify_shards(key, shards)
        for p in problems[:5]:
            rep.fail(p)
        if len(problems) > 5:
            rep.fail(f"{key}: {len(problems) - 5} more shard(s) differ from the manifest")
        bad = len(problems)
        if not bad:
            rep.ok(f"{key}: every shard's sha256 matches the manifest (data.verify)")
    if not bad:
        total = sum(s.count for s in shards)
        if total <= 0:
            rep.fail(f"{key}={spec!r}: the shards hold no samples")
        else:
            rep.ok(f"{key}: {len(shards)} shard(s), {total} group(s)")


def model_dir(name: str) -> Path | None:
    """The local directory that ``from_pretrained(name)`` will read, or None if there is none."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if name.count("/") == 1 and not p.exists() and not name.startswith((".", "/")):
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
        if isinstance(hit, str):
            return Path(hit).parent
    return None


def check_model(cfg: JRMConfig, rep: Report) -> Path | None:
    name = cfg.model.name
    d = model_dir(name)
    if d is None:
        rep.fail(f"model.name={name!r}: not a local directory and not in the Hugging Face cache "
                 f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}); "
                 "download the checkpoint first (nothing is downloaded at run time) or set model.name=/path")
        return None
    problems = []
    if not (d / "config.json").is_file():
        problems.append("config.json")
    if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in d.iterdir()):
        problems.append("weights (*.safetensors)")
    if not any((d / t).is_file() for t in ("tokenizer.json", "tokenizer_config.json")):
        problems.append("tokenizer (tokenizer.json)")
    if problems:
        rep.fail(f"model.name={name!r}: {d} lacks {', '.join(problems)}")
        return None
    rep.ok(f"model.name: {d}")
    return d


def checkpoint_bytes(cfg: JRMConfig, d: Path | None) -> tuple[float, float] | None:
    """(one checkpoint, the export) in bytes, from the architecture (jrm_dist.plan's tensor inventory)."""
    from jrm_dist import plan

    try:
        arch = plan.load_arch(str(d) if d is not None else cfg.model.name)
    except (plan.PlanError, ConfigError, KeyError, ValueError):
        return None
    inv = plan.inventory(arch, cfg.model.head_hidden)
    total = plan.param_count(inv)
    if cfg.model.lora.r > 0:
        trainable = plan.lora_params(arch, cfg.model.lora.r, cfg.model.lora.target_modules) + \
            plan.param_count(inv, {"head"})
    else:
        trainable = plan.param_count(inv, plan.trainable_parts(cfg))
    pbytes = 2 if cfg.model.precision == "bf16" else 4
    # frozen parameters of a local safetensors base are re-read from it, not saved (checkpoint.frozen_source)
    local_base = d is not None and any((d / f).exists() for f in ("model.safetensors.index.json", "model.safetensors"))
    saved = trainable if local_base else total
    ckpt = saved * pbytes + trainable * OPTIM_BYTES.get(cfg.optim.name, 12.0)
    return ckpt, total * pbytes


def check_output(cfg: JRMConfig, d: Path | None, rep: Report, min_free_gib: float | None) -> None:
    from jrm_dist.runguard import output_dir_busy

    out = Path(cfg.train.output_dir).absolute()
    busy = output_dir_busy(out)
    if busy:
        rep.fail(busy)
        return
    base = out  # the trainer creates the directory: check the nearest one that exists
    while not base.exists():
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        rep.fail(f"train.output_dir={cfg.train.output_dir!r}: {base} is not a writable directory")
        return
    free = shutil.disk_usage(base).free
    if min_free_gib is None:
        sizes = checkpoint_bytes(cfg, d)
        if sizes is None:
            rep.ok(f"train.output_dir: {out} ({_size(free)} free; checkpoint size unknown)")
            return
        ckpt, export = sizes
        need = (cfg.train.keep_last + 1) * ckpt + export  # a new checkpoint exists before the oldest goes
        how = (f"{cfg.train.keep_last + 1} checkpoints x {_size(ckpt)} + export {_size(export)} "
               f"(train.keep_last={cfg.train.keep_last})")
    else:
        need, how = min_free_gib * GIB, "--min-free-gb"
    if free < need:
        rep.fail(f"train.output_dir={cfg.train.output_dir!r}: {_size(free)} free on {base}, "
                 f"needs {_size(need)} for {how}")
    else:
        rep.ok(f"train.output_dir: {out} ({_size(free)} free >= {_size(need)} for {how})")


def check_devices(device: str, nproc: int, rep: Report) -> None:
    if device != "cuda":
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < nproc:
        rep.fail(f"{nproc} process(es) per node need {nproc} GPU(s), this node has {n} "
                 f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    else:
        rep.ok(f"{n} GPU(s) on {os.uname().nodename} for {nproc} process(es)")


def run(args: argparse.Namespace) -> tuple[JRMConfig | None, list[str]]:
    rep = Report()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        rep.fail(str(e))
        return None, rep.problems
    rep.ok(f"config {args.config} ({len(args.overrides)} override(s))")
    check_shards("data.train_shards", cfg.data.train_shards, rep, required=True, verify=cfg.data.verify)
    check_shards("data.eval_shards", cfg.data.eval_shards, rep, required=False)
    d = check_model(cfg, rep)
    check_output(cfg, d, rep, args.min_free_gb)
    check_devices(args.device, args.nproc, rep)
    if not rep.problems:
        from jrm_dist.checkpoint import find_resume

        try:
            ck = find_resume(cfg.train.output_dir, args.resume)
        except Exception as e:
            rep.fail(f"train.output_dir={cfg.train.output_dir!r}: cannot read its checkpoints: {e}")
        else:
            rep.ok(f"resume: {ck}" if ck else "resume: no checkpoint yet, starting at step 0")
    return cfg, rep.problems


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jrm-preflight", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, as given to jrm-train")
    ap.add_argument("--resume", default="auto", help="as given to jrm-train: checks that it can be resumed")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: also check that this node has --nproc GPUs")
    ap.add_argument("--nproc", type=int, default=1, help="processes per node (GPUs needed with --device cuda)")
    ap.add_argument("--min-free-gb", type=float, default=None,
                    help="free space required under train.output_dir (default: estimated from the model)")
    ap.add_argument("--print-output-dir", action="store_true",
                    help="print the resolved train.output_dir on stdout when all checks pass")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    cfg, problems = run(args)
    if problems:
        print(f"preflight: {len(problems)} problem(s); nothing was launched", file=sys.stderr)
        return 2
    if args.print_output_dir:
        print(os.path.abspath(cfg.train.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
