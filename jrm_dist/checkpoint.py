"""Atomic training checkpoints with everything needed for an exact resume.

Layout (``<output_dir>/checkpoints``)::

    step_00000040/              one complete checkpoint (renamed into place only when complete)
        ds/                     DeepSpeed state (ZeRO partitions, optimizer, LR scheduler) — engine.save_checkpoint
        rank_00000.json ...     per rank: loader cursor (state_dict) and RNG states (python, numpy, torch, device)
        trainer_state.json      step, world size, MLflow run id, tokens seen, counters
        config.yaml             the resolved config
        hf/                     backbone config + tokenizer + image processor + jrm_config.json (for jrm-export)
        COMPLETE                written last, before the rename
    latest                      name of the newest complete checkpoint (replaced atomically)
    step_00000050.tmp/          a save in progress (or a crash mid-save): never loaded, removed by the next save

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
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
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
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


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
