"""Stage 1 of the data flow: the shard list. Shards come from a jrm-prep manifest.json (with per-shard
record counts and sha256), a folder holding one, a brace pattern, or a list of URLs; the counts are what the
epoch plan (:mod:`jrm_dist.data.slices`) needs for equal steps and an exact cursor."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Sequence

import braceexpand
from webdataset import gopen

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    url: str    # local path, pipe:..., or http(s):// URL (anything webdataset's gopen opens)
    count: int  # samples in the shard (from the manifest, or counted once)
    sha256: str | None = None  # from the manifest (data.verify checks it)


def _read_manifest(path: str, shard_root: str | None) -> list[Shard]:
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path}: field 'shards' is missing or not a list (not a jrm-prep manifest?)")
    root = shard_root if shard_root is not None else os.path.dirname(os.path.abspath(path))
    out = []
    for i, s in enumerate(manifest["shards"]):
        if "name" not in s or "count" not in s:
            raise ValueError(f"{path}: shards[{i}] lacks 'name' or 'count'")
        url = s["name"] if "://" in s["name"] or s["name"].startswith("pipe:") else _join(root, s["name"])
        out.append(Shard(url, int(s["count"]), s.get("sha256")))
    return out


def _join(root: str, name: str) -> str:
    if "://" in root or root.startswith("pipe:"):
        return root.rstrip("/") + "/" + name
    return os.path.join(root, name)


def count_samples(url: str) -> int:
    """Number of samples in one shard (one pass over its tar headers)."""
    n, last = 0, None
    with gopen(url, "rb") as stream:
        for member in tarfile.open(fileobj=stream, mode="r|*"):
            key = os.path.basename(member.name).split(".", 1)[0]
            if member.isreg() and key != last:
                n, last = n + 1, key
    return n


def resolve_shards(spec: str | Sequence[str], shard_root: str | None = None) -> list[Shard]:
    """Shards from a manifest.json, a folder holding one, a brace pattern, or a list of URLs.

    Without a manifest the sample counts (needed for equal steps and the cursor) come from a
    manifest.json next to local shards when it lists them, else from one counting pass (logged).
    """
    if not spec:
        raise ValueError("no shards given (data.train_shards / eval_shards is empty)")
    if isinstance(spec, str):
        if os.path.isdir(spec):
            spec = os.path.join(spec, "manifest.json")
        if spec.endswith(".json"):
            if not os.path.exists(spec):
                raise FileNotFoundError(f"manifest {spec} does not exist")
            return _read_manifest(spec, shard_root)
        urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
    else:
        urls = list(spec)
    if not urls:
        raise ValueError("empty shard list")
    counts: dict[str, int] = {}
    for folder in {os.path.dirname(os.path.abspath(u)) for u in urls if "://" not in u and not u.startswith("pipe:")}:
        mpath = os.path.join(folder, "manifest.json")
        if os.path.exists(mpath):
            for s in _read_manifest(mpath, None):
                counts[os.path.abspath(s.url)] = s.count
    shards = []
    for u in urls:
        c = counts.get(os.path.abspath(u)) if "://" not in u and not u.startswith("pipe:") else None
        if c is None:
            log.warning("no manifest entry for %s: counting its samples (one extra read)", u)
            c = count_samples(u)
        shards.append(Shard(u, c))
    return shards


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def resolve_config_shards(key: str, spec: str) -> list[Shard]:
    """:func:`resolve_shards` for a config key (``data.train_shards``): fails fast, naming the key, when
    the path or a local shard does not exist (instead of a reader error once training started)."""
    if not spec:
        raise ValueError(f"{key} is empty: point it at a jrm-prep output folder or its manifest.json")
    if _is_local(spec) and "{" not in spec and "::" not in spec and not os.path.exists(spec):
        raise FileNotFoundError(f"{key}={spec!r} does not exist (expected a jrm-prep output folder, its "
                                "manifest.json, or a shard pattern such as shards/shard-{000000..000099}.tar)")
    try:
        shards = resolve_shards(spec)
    except (OSError, ValueError) as exc:
        raise type(exc)(f"{key}={spec!r}: {exc}") from None
    missing = [s.url for s in shards if _is_local(s.url) and not os.path.exists(s.url)]
    if missing:
        raise FileNotFoundError(f"{key}={spec!r}: {len(missing)} shard(s) missing, e.g. {', '.join(missing[:3])}")
    return shards


def verify_shards(key: str, shards: Sequence[Shard]) -> list[str]:
    """sha256 of every local shard against its manifest entry (data.verify); returns the problems."""
    problems = []
    for s in shards:
        if not _is_local(s.url):
            continue
        if not s.sha256:
            problems.append(f"{key}: {s.url}: no sha256 in a manifest to check against (data.verify=true "
                            "needs a jrm-prep manifest.json)")
            continue
        with open(s.url, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != s.sha256:
            problems.append(f"{key}: shard {s.url}: sha256 {digest}, manifest says {s.sha256} (changed or damaged "
                            "since jrm-prep wrote it; `jrm-prep verify` re-checks every record)")
    return problems


def shards_digest(shards: Sequence[Shard]) -> str:
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{os.path.basename(s.url)}\t{s.count}\n".encode())
    return h.hexdigest()[:16]
