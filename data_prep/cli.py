"""``jrm-prep``: turn raw preference data into verified webdataset shards (see data_prep/README.md).

Sub-commands: editreward, jsonl, synthetic (write shards), verify (check them), rationales (join
teacher critiques into existing shards). Exit codes: 0 ok, 1 verify found a bad shard, 2 bad usage
or a job-level error (the message names the file).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any, Callable, Iterator

from tqdm import tqdm

from jrm_dist.data.schema import SchemaError

from . import editreward, jsonl_groups, rationales, verify
from .images import check_image
from .writer import (Item, PrepError, ResumableShardWriter, Result, Summary, dump_record, ordered_map,
                     parse_size, safe_convert, sha256_file)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder for shards, manifest.json, rejects.jsonl")
    p.add_argument("--shard-size", default="1GB", help="target shard size (e.g. 1GB, 200MB; default 1GB)")
    p.add_argument("--max-count", type=int, default=100_000, help="max samples per shard (default 100000)")
    p.add_argument("--workers", type=int, default=1, help="processes for image decode/validation")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="re-encode images larger than this many pixels (default: keep original bytes)")
    p.add_argument("--overwrite", action="store_true", help="discard existing output instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _images_outside(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-outside-images", action="store_true",
                   help="read image paths that lead out of --images (absolute or with ..); default: reject the "
                        "record as image_outside_root")


def _source_options(args, files: list[str]) -> dict:
    """The manifest's options of a source read from files (what a resumed run must repeat)."""
    options = {"inputs": [_file_id(f) for f in files], "images": args.images, "max_pixels": args.max_pixels}
    if args.allow_outside_images:  # only when set: manifests written before the flag stay resumable
        options["allow_outside_images"] = True
    return options


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jrm-prep", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("editreward", help="EditReward-Data parquet rows -> groups with K=2")
    p.add_argument("--input", nargs="+", required=True, help="parquet files or folders (searched recursively)")
    p.add_argument("--images", default=None, help="root for Image structs that hold a path instead of bytes")
    _images_outside(p)
    _common(p)
    p = sub.add_parser("jsonl", help="generic JSONL of groups (format in data_prep/README.md)")
    p.add_argument("--input", nargs="+", required=True, help="one or more .jsonl files")
    p.add_argument("--images", default=None, help="root for relative image paths (default: the file's folder)")
    _images_outside(p)
    _common(p)
    p = sub.add_parser("synthetic", help="learnable synthetic task: coloured squares + templated rationales")
    p.add_argument("--groups", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=2, help="candidates per group (2..6)")
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--quality-share", type=float, default=0.5,
                   help="share of quality (noise) groups; the rest are colour (instruction-following) groups")
    p.add_argument("--rationale-style", default="default", choices=("default", "verdict_first"),
                   help="templated rationale: description then verdict (default) or verdict first")
    _common(p)
    p = sub.add_parser("rationales", help="join teacher rationales (by key) into existing shards")
    p.add_argument("--shards", required=True, help="input shards folder (with manifest.json)")
    p.add_argument("--rationales", required=True, help="JSONL of {key, rationale?, candidates?}")
    _common(p)
    p = sub.add_parser("verify", help="re-read shards, check sha256/counts/records against manifest.json")
    p.add_argument("shards", help="shards folder or its manifest.json")
    p.add_argument("--quiet", action="store_true")
    return ap


def _synthetic_convert(item: Item, seed: int, k: int, size: int, max_pixels: int | None,
                       quality_share: float = 0.5, rationale_style: str = "default") -> Result:
    from .synthetic import make_group
    rec, images = make_group(seed, item.payload, k=k, size=size, quality_share=quality_share,
                             rationale_style=rationale_style)
    sample: dict[str, bytes] = {"__key__": rec["key"]}
    for name, data in images.items():
        stored, ext = check_image(data, name, max_pixels)
        if not name.endswith("." + ext):
            raise SchemaError("unsupported_image_format", f"{name}: re-encoded as {ext}")
        sample[name] = stored
    sample["json"] = dump_record(rec)
    return Result(key=rec["key"], sample=sample)


def run_job(writer: ResumableShardWriter, items: Iterator[Item], convert: Callable[[Item], Result],
            workers: int, total: int, desc: str, quiet: bool) -> None:
    """The one loop every writing sub-command shares: convert (in parallel, in order), dedupe keys,
    write or reject. A sample is written before the extra rejects it causes (resume bookkeeping)."""
    bar = tqdm(total=total, initial=min(writer.skip_inputs, total), desc=desc, unit="rec",
               disable=True if quiet else None, dynamic_ncols=True)
    try:
        for item, res in ordered_map(functools.partial(safe_convert, convert), items, workers):
            if res.sample is not None:
                key = res.sample["__key__"]
                if key in writer.seen_keys:
                    writer.reject(item, key, "duplicate_key", f"key {key!r} was already written by an earlier record")
                else:
                    writer.write(item.index, res.sample)
            else:
                writer.reject(item, res.key, res.reason or "unexpected_error", res.detail or "")
            for line in res.extra:
                writer.reject(None, line.pop("key", None), line.pop("reason"), line.pop("detail"), line=line)
            bar.update(1)
    finally:
        bar.close()


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"


def print_summary(cmd: str, out: str, s: Summary) -> None:
    reasons = ", ".join(f"{k}={v}" for k, v in s.reasons.items())
    print(f"jrm-prep {cmd}: written {s.written} samples in {s.shards} shards ({_fmt_bytes(s.bytes)}), "
          f"rejected {s.rejected}{f' ({reasons})' if reasons else ''}, {s.seconds:.1f} s -> "
          f"{os.path.join(out, 'manifest.json')}" + (f", see {os.path.join(out, 'rejects.jsonl')}" if s.rejected else ""))


def _file_id(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size}


def _write_command(args: argparse.Namespace, argv: list[str]) -> int:
    t0 = time.time()
    command = ["jrm-prep", *argv]
    common = dict(shard_size=parse_size(args.shard_size), max_count=args.max_count, overwrite=args.overwrite)
    if args.max_count < 1 or common["shard_size"] < 1:
        raise PrepError("--max-count and --shard-size must be positive")
    extra: dict[str, Any] = {}
    if args.cmd == "synthetic":
        from .synthetic import COLOURS
        if not 2 <= args.k <= len(COLOURS) or args.image_size < 8 or args.groups < 0:
            raise PrepError(f"need 2 <= --k <= {len(COLOURS)}, --image-size >= 8, --groups >= 0")
        if not 0.0 <= args.quality_share <= 1.0:
            raise PrepError(f"--quality-share={args.quality_share}: must be in [0, 1]")
        options = {"groups": args.groups, "seed": args.seed, "k": args.k, "image_size": args.image_size,
                   "max_pixels": args.max_pixels}
        if args.quality_share != 0.5 or args.rationale_style != "default":  # old manifests stay resumable
            options.update(quality_share=args.quality_share, rationale_style=args.rationale_style)
        writer = ResumableShardWriter(args.out, source="synthetic", command=command, options=options, **common)
        total = args.groups
        items = (Item(index=i, file="synthetic", locator={"index": i}, key=None, payload=i)
                 for i in range(writer.skip_inputs, total))
        convert = functools.partial(_synthetic_convert, seed=args.seed, k=args.k, size=args.image_size,
                                    max_pixels=args.max_pixels, quality_share=args.quality_share,
                                    rationale_style=args.rationale_style)
    elif args.cmd == "editreward":
        files = editreward.list_parquet(args.input)
        options = _source_options(args, files)
        writer = ResumableShardWriter(args.out, source="editreward", command=command, options=options, **common)
        total = editreward.count_rows(files)
        items = editreward.iter_items(files, writer.skip_inputs)
        convert = functools.partial(editreward.convert, images_root=args.images, max_pixels=args.max_pixels,
                                    allow_outside=args.allow_outside_images)
    elif args.cmd == "jsonl":
        for f in args.input:
            if not os.path.isfile(f):
                raise PrepError(f"input {f} does not exist")
        options = _source_options(args, args.input)
        writer = ResumableShardWriter(args.out, source="jsonl", command=command, options=options, **common)
        total = jsonl_groups.count_lines(args.input)
        items = jsonl_groups.iter_items(args.input, writer.skip_inputs)
        convert = functools.partial(jsonl_groups.convert, images_root=args.images, max_pixels=args.max_pixels,
                                    allow_outside=args.allow_outside_images)
    else:  # rationales
        manifest, folder = verify.load_manifest(args.shards)
        if not os.path.isfile(args.rationales):
            raise PrepError(f"rationale file {args.rationales} does not exist")
        options = {"shards": [s["sha256"] for s in manifest["shards"]],
                   "rationales": sha256_file(args.rationales), "max_pixels": None}
        writer = ResumableShardWriter(args.out, source="rationales", command=command, options=options, **common)
        table, bad = rationales.load_rationales(args.rationales)
        n_samples = sum(int(s["count"]) for s in manifest["shards"])
        total = n_samples + 1  # the last position holds the rationale-file rejects (bad or unused lines)
        items = rationales.iter_items(folder, manifest["shards"], table, writer.skip_inputs)
        convert = functools.partial(rationales.convert, rationale_file=args.rationales)
        extra = {"input_manifest": os.path.join(folder, "manifest.json"), "rationale_file": args.rationales}
    try:
        run_job(writer, items, convert, args.workers, total, args.cmd, args.quiet)
        if args.cmd == "rationales" and writer.skip_inputs <= n_samples:
            matched = writer.seen_keys | writer.rejected_keys
            trailing = [(ln, k, r, d) for ln, k, r, d in bad]
            trailing += [(ln, k, "unknown_key", "no group with this key in the input shards")
                         for k, (ln, _) in table.items() if k not in matched]
            for ln, k, r, d in sorted(trailing, key=lambda t: t[0]):
                writer.reject(None, k, r, d, line={"file": args.rationales, "line": ln})
        summary = writer.finish(total, time.time() - t0, extra)
    except BaseException:
        writer.abort()
        raise
    print_summary(args.cmd, args.out, summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.cmd == "verify":
        return verify.verify(args.shards, quiet=args.quiet)
    if args.workers < 1:
        print("jrm-prep: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        return _write_command(args, argv)
    except (PrepError, FileNotFoundError, ValueError) as exc:
        print(f"jrm-prep {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
