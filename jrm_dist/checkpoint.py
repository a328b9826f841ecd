"""Atomic training checkpoints with everything needed for an exact resume.

Layout (``<output_dir>/checkpoints``)::

    step_00000040/              one complete checkpoint (renamed into place only when complete)
        ds/                     DeepSpeed state (ZeRO partitions, optimizer, LR scheduler) — engine.save_checkpoint
        latest, zero_to_fp32.py DeepSpeed's tag file ("ds") and its consolidation script (stock usage works)
        rank_00000.json ...     per rank: loader cursor (state_dict) and RNG states (python, numpy, torch, device)
        trainer_state.json      step, world size, MLflow run id, tokens seen, counters
        config.yaml             the resolved config
        hf/                     backbone config + tokenizer + image processor + jrm_config.json (for jrm-export)
        COMPLETE                written last, before the rename
    latest                      name of the newest complete checkpoint (replaced atomically)
    step_00000050.tmp/          a save in progress (or a crash mid-save): never loaded, removed by the next save
    trash.step_00000030/        a pruned checkpoint being deleted: renamed first (one atomic step, so a crash
                                never leaves a half-deleted step_*), removed by the next save or start

Everything we write is JSON/YAML (no pickle): RNG byte states are base64. Only DeepSpeed's own files
under ``ds/`` are torch-serialised, as DeepSpeed writes and reads them.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
DS_TAG = "ds"
STEP_RE = re.compile(r"^step_(\d{8})$")
TRASH_PREFIX = "trash."  # never matches STEP_RE: find_resume/list_checkpoints cannot pick a pruned folder


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def ckpt_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


# ----------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {
        "python": _py_state_to_json(random.getstate()),
        "numpy": _np_state_to_json(np.random.get_state()),
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        st["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(_py_state_from_json(st["python"]))
    np.random.set_state(_np_state_from_json(st["numpy"]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(st["torch"])), dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(st["cuda"])), dtype=torch.uint8))


def _py_state_to_json(s):
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _py_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])


def _np_state_to_json(s):
    name, keys, pos, has_gauss, cached = s
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _np_state_from_json(s):
    return (s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4])


# ----------------------------------------------------------------------------- discovery

def is_complete(path: Path) -> bool:
    return (path / COMPLETE).exists() and (path / "trainer_state.json").exists() and (path / DS_TAG).is_dir()


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = ckpt_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def find_resume(output_dir, resume: str) -> Path | None:
    """``auto``: the checkpoint named by ``latest`` if complete, else the newest complete one, else None;
    ``none``: None; anything else: that path (a run dir or a step dir), which must be complete."""
    if resume == "none":
        return None
    if resume == "auto":
        root = ckpt_root(output_dir)
        latest = root / LATEST
        if latest.exists():
            cand = root / latest.read_text().strip()
            if is_complete(cand):
                return cand
            log.warning("checkpoint %s named by %s is missing or incomplete; looking for an older one", cand, latest)
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    p = Path(resume)
    if (p / "checkpoints").is_dir():
        found = find_resume(p, "auto")
        if found is None:
            raise FileNotFoundError(f"--resume {resume}: no complete checkpoint under {p / 'checkpoints'}")
        return found
    if not is_complete(p):
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (missing {COMPLETE}, "
                                f"trainer_state.json or {DS_TAG}/)")
    return p


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())


def read_rank_state(path: Path, rank: int) -> dict[str, Any]:
    return json.loads((path / f"rank_{rank:05d}.json").read_text())


# ----------------------------------------------------------------------------- save

def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def source_fingerprint(path: str | os.PathLike) -> str:
    """Identity of a safetensors checkpoint folder: its index, headers, sizes and sampled data bytes. A run
    whose frozen parameters are re-read from ``model.name`` on resume and export refuses a folder whose
    fingerprint changed."""
    import hashlib

    d = Path(path)
    h = hashlib.sha256()
    idx = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
    if idx.exists():
        h.update(idx.read_bytes())
    for f in files:
        fp = d / f
        size = fp.stat().st_size
        with open(fp, "rb") as fh:  # the safetensors header (names, dtypes, shapes, offsets) + 64 samples of
            n = int.from_bytes(fh.read(8), "little")  # the data: another fine-tune of the same shapes differs
            h.update(fh.read(min(n, 1 << 26)))  # almost everywhere; hashing all of a 145 GB model would not
            for i in range(64):  # be cheap
                fh.seek(8 + n + (size - 8 - n) * i // 64)
                h.update(fh.read(4096))
        h.update(f"{f}:{size}".encode())
    return h.hexdigest()


def frozen_source(model, model_name: str) -> dict[str, str] | None:
    """Where the frozen parameters can be re-read instead of being saved in every checkpoint (LoRA: the whole
    base, ~2 bytes x parameters per checkpoint): ``model.name`` when it is a local safetensors folder and some
    parameter is frozen; None otherwise (then DeepSpeed saves them as usual)."""
    d = Path(model_name)
    if all(p.requires_grad for p in model.parameters()):
        return None
    if not ((d / "model.safetensors.index.json").exists() or (d / "model.safetensors").exists()):
        return None
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return {"path": str(d.resolve()), "fingerprint": source_fingerprint(d), "dtype": str(dtype).split(".")[-1]}


def check_frozen_source(saved: dict | None, model_name: str, checkpoint: Path) -> None:
    """A checkpoint saved without its frozen parameters resumes only on the same base weights."""
    if not saved:
        return
    d = Path(model_name)
    if not d.is_dir() or source_fingerprint(d) != saved["fingerprint"]:
        raise ValueError(f"{checkpoint} holds only the trained parameters; its frozen ones are those of "
                         f"{saved['path']} (fingerprint {saved['fingerprint'][:12]}), but model.name={model_name} "
                         f"{'is not a folder' if not d.is_dir() else 'holds different weights'}: point model.name at "
                         f"the original base checkpoint")


def save(engine, output_dir, step: int, *, rank: int, loader_state: dict, trainer_state: dict,
         config_yaml: str, hf_files=None, keep_last: int = 2, fault_hook=None) -> Path:
    """Collective: every rank writes its part into ``step_N.tmp``; rank 0 marks it complete, renames it
    into place, repoints ``latest`` and prunes old checkpoints. A crash at any point before the rename
    leaves the previous checkpoint as the newest complete one."""
    root = ckpt_root(output_dir)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        sweep(output_dir)
        tmp.mkdir()
    _barrier()
    # save_latest: DeepSpeed's own ``latest`` (= "ds") inside the step folder, so the zero_to_fp32.py it copies
    # there works as documented (``python zero_to_fp32.py . OUT``) without ``-t ds``
    # Frozen parameters re-read from trainer_state["frozen_from"] (model.name) are not written again.
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=True,
                           exclude_frozen_parameters=bool(trainer_state.get("frozen_from")))
    _write_json(tmp / f"rank_{rank:05d}.json", {"rank": rank, "loader": loader_state, "rng": rng_state()})
    if fault_hook is not None:
        fault_hook("save", step)  # tests: crash in the middle of a save
    _barrier()
    if rank == 0:
        _write_json(tmp / "trainer_state.json", trainer_state)
        (tmp / "config.yaml").write_text(config_yaml)
        if hf_files is not None:
            hf_files(tmp / "hf")
        _fsync_dir(tmp)
        (tmp / COMPLETE).write_text(str(step))
        if final.exists():  # a re-save of the same step (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
        _fsync_dir(root)
        prune(output_dir, keep_last, fault_hook=(lambda: fault_hook("prune", step)) if fault_hook else None)
    _barrier()
    return final


def prune(output_dir, keep_last: int, fault_hook=None) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete checkpoints, crash-safe: each is first renamed to
    ``trash.step_N`` (atomic), then deleted; a crash in between leaves only a trash folder, which
    :func:`sweep` removes at the next start or save. Returns the renamed folders."""
    root = ckpt_root(output_dir)
    trashed = []
    for old in list_checkpoints(output_dir)[:-keep_last]:
        dst = root / (TRASH_PREFIX + old.name)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(old, dst)
        trashed.append(dst)
    if trashed:
        _fsync_dir(root)
    for d in trashed:
        _rmtree_loud(d, fault_hook)
    return trashed


def sweep(output_dir) -> list[Path]:
    """Delete what a crash left behind: unfinished saves (``step_N.tmp``) and pruned folders not yet
    deleted (``trash.*``). Rank 0 calls it at the start of a run and before every save."""
    root = ckpt_root(output_dir)
    if not root.is_dir():
        return []
    left = sorted(p for p in root.iterdir()
                  if p.is_dir() and (p.name.startswith(TRASH_PREFIX) or (p.name.startswith("step_")
                                                                         and p.name.endswith(".tmp"))))
    for p in left:
        log.warning("removing %s left by an interrupted save or prune", p)
        _rmtree_loud(p)
    return left


def _rmtree_loud(path: Path, fault_hook=None) -> None:
    """rmtree that says what it could not delete (a silently kept half-deleted folder can be 1 TB)."""
    def onerror(func, p, exc_info):
        log.warning("could not delete %s: %s", p, exc_info[1])
    entries = sorted(path.iterdir()) if fault_hook is not None and path.is_dir() else []
    if entries:  # tests: delete part of the folder, then let the fault hook kill the process
        first = entries[0]
        shutil.rmtree(first) if first.is_dir() else first.unlink()
        fault_hook()
    shutil.rmtree(path, onerror=onerror)


def weight_stats(module, device) -> tuple[bool, str | None, float]:
    """Collective over the local weights of every rank (ZeRO-3: each rank's partitions ``ds_tensor``;
    otherwise the full tensors): (all finite, first non-finite name on this rank, global L2 norm).

    The norm is over what the ranks hold, so under ZeRO-1/2 (every rank holds every weight) it is
    sqrt(world) times the model's: compare it only with norms taken the same way (the divergence guard
    compares with the run's own starting norm). Each tensor is scaled by its max first, so weights of
    ~1e30 give a finite norm instead of overflowing float32."""
    bad = None
    sq = 0.0
    with torch.no_grad():
        for name, p in module.named_parameters():
            t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            if not t.numel():
                continue
            if not bool(torch.isfinite(t).all()):
                bad = bad or name
                continue
            m = float(t.abs().max())
            if m > 0:
                sq += (m * float(torch.linalg.vector_norm(t / m))) ** 2
    if torch.distributed.is_initialized():
        acc = torch.tensor([0.0 if bad is None else 1.0, sq], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(acc)
        return bool(acc[0].item() == 0), bad, float(acc[1].item()) ** 0.5
    return bad is None, bad, sq ** 0.5


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, json.dumps(obj))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- universal (world-size change)

def to_universal(path: Path) -> Path:
    """Convert ``path/ds`` to DeepSpeed's universal checkpoint format (``path/ds_universal``), once.
    Needed when the world size differs from the one that saved it (ZeRO partitions are per rank)."""
    out = path / (DS_TAG + "_universal")
    if (out / COMPLETE).exists():
        return out
    import subprocess
    import sys

    tmp = path / (DS_TAG + "_universal.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / DS_TAG),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--no_strict"]
    log.warning("world size changed: converting %s to a DeepSpeed universal checkpoint (%s)", path, " ".join(cmd))
    subprocess.run(cmd, check=True)
    (tmp / COMPLETE).write_text("")
    os.replace(tmp, out)
    return out
