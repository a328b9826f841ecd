"""Reading our own shards back (verify, rationales): manifest loading and sample iteration."""
from __future__ import annotations

import json
import os
import tarfile
from typing import Any, Iterator

from .writer import MANIFEST


def load_manifest(path: str) -> tuple[dict[str, Any], str]:
    """``path`` is a shards folder or its manifest.json; returns (manifest, folder)."""
    mpath = os.path.join(path, MANIFEST) if os.path.isdir(path) else path
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"{mpath} does not exist (is {path} a jrm-prep output folder?)")
    with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{mpath}: field 'shards' is missing or not a list")
    return manifest, os.path.dirname(os.path.abspath(mpath))


def iter_tar_samples(path: str) -> Iterator[dict[str, bytes]]:
    """Samples of one shard in order, as {'__key__': key, field: bytes}. Reads the tar as a stream
    (members of one sample are adjacent, as ShardWriter writes them); errors propagate."""
    current: dict[str, bytes] | None = None
    with tarfile.open(path, "r|") as tf:
        for m in tf:
            if not m.isreg():
                continue
            if "." not in m.name:
                raise ValueError(f"member {m.name!r} has no '.field' suffix")
            key, field = m.name.split(".", 1)
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            if field in current:
                raise ValueError(f"sample {key!r} has field {field!r} twice")
            current[field] = tf.extractfile(m).read()
    if current is not None:
        yield current
