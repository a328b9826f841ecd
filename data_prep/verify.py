"""``jrm-prep verify``: re-read every shard and check it against manifest.json, so a copy to a cluster
(or a disk error) is caught before a multi-node job starts on bad data."""
from __future__ import annotations

import json
import os
import sys
import tarfile

from tqdm import tqdm

from jrm_dist.data.schema import SCHEMA_VERSION, SchemaError, validate_group

from .shards import iter_tar_samples, load_manifest
from .writer import _SHARD_RE, sha256_file


class BadShard(Exception):
    pass


def check_shard(path: str, entry: dict, seen: set[str]) -> None:
    """Raise BadShard with the reason when the shard differs from its manifest entry."""
    if not os.path.exists(path):
        raise BadShard("file is missing")
    size = os.path.getsize(path)
    if size != entry.get("bytes"):
        raise BadShard(f"size {size} bytes, manifest says {entry.get('bytes')}")
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        raise BadShard(f"sha256 {digest}, manifest says {entry.get('sha256')}")
    count = 0
    try:
        for sample in iter_tar_samples(path):
            key = sample["__key__"]
            if "json" not in sample:
                raise BadShard(f"sample {key!r} has no json record")
            try:
                rec = json.loads(sample["json"])
                validate_group(rec, set(sample) - {"__key__", "json"})
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BadShard(f"sample {key!r}: json record does not parse: {exc}") from None
            except SchemaError as exc:
                raise BadShard(f"sample {key!r}: {exc}") from None
            if rec.get("key") != key:
                raise BadShard(f"sample {key!r}: record key is {rec.get('key')!r}")
            if rec.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
                raise BadShard(f"sample {key!r}: schema_version {rec.get('schema_version')} != {SCHEMA_VERSION}")
            if key in seen:
                raise BadShard(f"sample key {key!r} appears twice in the data set")
            seen.add(key)
            count += 1
    except (tarfile.TarError, ValueError, OSError) as exc:
        raise BadShard(f"tar does not read: {type(exc).__name__}: {exc}") from None
    if count != entry.get("count"):
        raise BadShard(f"{count} samples, manifest says {entry.get('count')}")


def verify(path: str, quiet: bool = False) -> int:
    """Return 0 when every shard matches, 1 at the first bad shard (named on stderr), 2 on no manifest."""
    try:
        manifest, folder = load_manifest(path)
    except (OSError, ValueError) as exc:
        print(f"jrm-prep verify: {exc}", file=sys.stderr)
        return 2
    seen: set[str] = set()
    total = 0
    shards = manifest["shards"]
    for entry in tqdm(shards, desc="verify", unit="shard", disable=True if quiet else None):
        spath = os.path.join(folder, entry.get("name", "?"))
        try:
            check_shard(spath, entry, seen)
        except BadShard as exc:
            print(f"jrm-prep verify: BAD shard {spath}: {exc}", file=sys.stderr)
            return 1
        total += entry["count"]
    if total != manifest.get("total_samples"):
        print(f"jrm-prep verify: BAD manifest {folder}: shards hold {total} samples, "
              f"total_samples says {manifest.get('total_samples')}", file=sys.stderr)
        return 1
    listed = {e.get("name") for e in shards}
    stray = sorted(n for n in os.listdir(folder) if _SHARD_RE.match(n) and n not in listed)
    if stray:
        print(f"jrm-prep verify: warning: {len(stray)} shard file(s) not in the manifest (ignored): "
              f"{', '.join(stray[:5])}", file=sys.stderr)
    print(f"jrm-prep verify: OK {len(shards)} shards, {total} samples in {folder}")
    return 0
