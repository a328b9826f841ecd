"""Groups/s through our streaming loader vs HF ``datasets`` reading the same groups from parquet,
both feeding the same processor (encode_group) and Collator, side by side in one run.

    .venv/bin/python bench/bench_loader.py --groups 512 --workers 2

The data: ``jrm-prep synthetic`` shards; the same records and image bytes written to parquet with
HF ``Image`` features. Both sides use a torch DataLoader with the same workers and groups per batch,
shuffle on, and decode images from bytes; an epoch is timed end to end (worker start included).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from _result import emit  # noqa: E402
from data_prep.cli import main as prep  # noqa: E402
from data_prep.shards import iter_tar_samples, load_manifest  # noqa: E402
from jrm_dist.data.collate import Collator, encode_group  # noqa: E402
from jrm_dist.data.loader import StreamingLoader, _encode  # noqa: E402


def build_processor(max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from jrm_dist.backbones import build_tiny_tokenizer
    from jrm_dist.processing import RewardProcessor
    return RewardProcessor(build_tiny_tokenizer(), Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels))


def write_parquet(shards_dir: str, path: str, k: int) -> None:
    """The shards' records and image bytes as an HF dataset with Image columns, saved as parquet."""
    import datasets
    manifest, folder = load_manifest(shards_dir)
    rows = {"key": [], "record": [], "src0": [], **{f"c{c}_0": [] for c in range(k)}}
    for s in manifest["shards"]:
        for sample in iter_tar_samples(os.path.join(folder, s["name"])):
            rows["key"].append(sample["__key__"])
            rows["record"].append(sample["json"].decode())
            for col in rows:
                if col not in ("key", "record"):
                    rows[col].append({"bytes": sample[f"{col}.png"], "path": None})
    feats = datasets.Features({"key": datasets.Value("string"), "record": datasets.Value("string"),
                               **{c: datasets.Image() for c in rows if c not in ("key", "record")}})
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(path)


class HFGroups(torch.utils.data.Dataset):
    """Map-style view of the parquet file through HF datasets (images decoded to PIL by datasets)."""

    def __init__(self, path: str, cache_dir: str):
        import datasets
        self.ds = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=cache_dir)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[i]
        rec = json.loads(row["record"])
        return rec, {c: v for c, v in row.items() if c not in ("key", "record")}


def hf_collate(items, processor, collator):
    return collator([encode_group(processor, rec, {f"{c}.png": im for c, im in imgs.items()}) for rec, imgs in items])


def decode_only(rec, images):
    """Read-only pipeline (no processor): parse + decode every image; shows the loaders' own cost."""
    from jrm_dist.processing import open_image
    for name, im in images.items():
        open_image(im, name)
    return rec["key"]


def keys_only(groups):
    return {"keys": list(groups)}


def hf_decode_collate(items):
    return keys_only([decode_only(rec, imgs) for rec, imgs in items])


def time_epochs(make_iter, epochs: int) -> list[tuple[float, int]]:
    out = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for batch in make_iter():
            n += len(batch["keys"])
        out.append((time.perf_counter() - t0, n))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=512)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--max-pixels", type=int, default=112 * 112)
    ap.add_argument("--batch", type=int, default=4, help="groups per micro-batch")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_loader_")
    shards = os.path.join(work, "shards")
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        prep(["synthetic", "--out", shards, "--groups", str(args.groups), "--k", str(args.k), "--image-size",
              str(args.image_size), "--max-count", "64", "--quiet"])
    pq_path = os.path.join(work, "groups.parquet")
    if not os.path.exists(pq_path):
        write_parquet(shards, pq_path, args.k)
    processor = build_processor(args.max_pixels)
    collator = Collator(processor)

    enc = functools.partial(_encode, processor=processor, rank_by="overall", use_rationale=True,
                            encode_group=encode_group)
    ours = StreamingLoader(shards, enc, collator, batch_size=args.batch, num_workers=args.workers, shuffle_buffer=64)
    hf_ds = HFGroups(pq_path, os.path.join(work, "hf_cache"))
    hf = functools.partial(DataLoader, hf_ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                           collate_fn=functools.partial(hf_collate, processor=processor, collator=collator),
                           generator=torch.Generator().manual_seed(0))
    ours_raw = StreamingLoader(shards, decode_only, keys_only, batch_size=args.batch, num_workers=args.workers,
                               shuffle_buffer=64)
    hf_raw = functools.partial(DataLoader, hf_ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                               collate_fn=hf_decode_collate, generator=torch.Generator().manual_seed(0))
    rows = [
        ("full: decode + processor + collate", time_epochs(lambda: iter(ours), args.epochs),
         time_epochs(lambda: iter(hf()), args.epochs)),
        ("read + image decode only", time_epochs(lambda: iter(ours_raw), args.epochs),
         time_epochs(lambda: iter(hf_raw()), args.epochs)),
    ]
    print(f"# {args.groups} groups, K={args.k}, {args.image_size}px PNG, max_pixels={args.max_pixels}, "
          f"{args.batch} groups/batch, {args.workers} DataLoader workers, torch threads 1, {os.cpu_count()} CPUs")
    print(f"{'pipeline':<36} {'epoch':>5} {'ours groups/s':>14} {'HF datasets groups/s':>21} {'ours/HF':>8}")
    for name, r_ours, r_hf in rows:
        for e, ((t1, n1), (t2, n2)) in enumerate(zip(r_ours, r_hf)):
            print(f"{name:<36} {e:>5} {n1 / t1:>14.1f} {n2 / t2:>21.1f} {(n1 / t1) / (n2 / t2):>8.2f}")
        best1, best2 = max(n / t for t, n in r_ours), max(n / t for t, n in r_hf)
        print(f"{name:<36} {'best':>5} {best1:>14.1f} {best2:>21.1f} {best1 / best2:>8.2f}")
        emit(f"loader: {name}", best1, best2, "groups/s", True, "ours = StreamingLoader, baseline = HF datasets parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
