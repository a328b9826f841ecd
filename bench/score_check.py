"""Score held-out groups of an export two ways and compare: plain transformers running the README's
"Scoring an export without jrm-dist" block (jrm_dist blocked from import), and ``jrm-eval``'s Scorer
(``JointRewardModel.score``). Used by the real-size rehearsal (bench/rehearse_7b.py), where a 7B export
only fits this machine in bf16, one model at a time: each mode is its own process.

    python bench/score_check.py groups OUT_DIR --n 4            # write held-out groups (synthetic seed 1)
    python bench/score_check.py plain EXPORT GROUPS_DIR OUT.json --dtype bfloat16
    python bench/score_check.py jrm   EXPORT GROUPS_DIR OUT.json --dtype bfloat16
    python bench/score_check.py compare A.json B.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_groups(out: Path, n: int, seed: int = 1) -> None:
    """Each group's images as files plus groups.json: [{"instruction", "sources", "candidates"}]."""
    from data_prep.synthetic import make_group

    out.mkdir(parents=True, exist_ok=True)
    groups = []
    for i in range(n):
        rec, imgs = make_group(seed, i)
        d = out / f"g{i}"  # every group names its images alike
        d.mkdir(exist_ok=True)
        for name, data in imgs.items():
            (d / name).write_bytes(data)
        groups.append({"key": rec.get("key", f"g{i}"), "instruction": rec["instruction"],
                       "sources": [f"g{i}/{n}" for n in rec["source_images"]],
                       "candidates": [f"g{i}/{c['images'][0]}" for c in rec["candidates"]]})
    (out / "groups.json").write_text(json.dumps(groups, indent=1))


def _items(groups_dir: Path):
    for g in json.loads((groups_dir / "groups.json").read_text()):
        for c in g["candidates"]:
            yield g["instruction"], [groups_dir / s for s in g["sources"]] + [groups_dir / c]


def readme_block() -> tuple[str, str]:
    """The README block split into its set-up (load once) and its per-input part."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text.split("## Scoring an export without jrm-dist", 1)[1], re.S).group(1)
    head, tail = code.split("images = [", 1)
    return head, "images = [" + tail


class _NoJrm:
    """Import hook: transformers alone must score the export."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jrm_dist", "data_prep", "jrm_kernels"):
            raise ImportError(f"{name} is blocked")
        return None


def score_plain(export: Path, groups_dir: Path, dtype: str) -> list[dict]:
    sys.meta_path.insert(0, _NoJrm())
    head, per_input = readme_block()
    head = re.sub(r"^export_dir = .*$", f"export_dir = {str(export)!r}", head, count=1, flags=re.M)
    head = head.replace("dtype=torch.float32", f"dtype=torch.{dtype}")
    ns: dict = {}
    t0 = time.time()
    exec(compile(head, "README.md (set-up)", "exec"), ns)
    out = [{"load_s": time.time() - t0}]
    for instruction, files in _items(groups_dir):
        ns["instruction"], ns["image_files"] = instruction, [str(f) for f in files]
        t = time.time()
        exec(compile(per_input, "README.md (per input)", "exec"), ns)
        out.append({"files": [f"{f.parent.name}/{f.name}" for f in files], "mu": ns["mu"], "sigma": ns["sigma"], "s": time.time() - t})
    return out


def score_jrm(export: Path, groups_dir: Path, dtype: str) -> list[dict]:
    from PIL import Image

    from jrm_dist.eval.common import Scorer

    t0 = time.time()
    scorer = Scorer(str(export), batch_size=1, device="cpu", dtype=dtype)
    out = [{"load_s": time.time() - t0}]
    for instruction, files in _items(groups_dir):
        ims = [Image.open(f).convert("RGB") for f in files]
        t = time.time()
        s = scorer.score_encoded([scorer.encode(instruction, ims[:-1], ims[-1:])])[0]
        out.append({"files": [f"{f.parent.name}/{f.name}" for f in files], "mu": s.mu, "sigma": s.sigma, "s": time.time() - t})
    return out


def compare(a: list[dict], b: list[dict]) -> dict:
    pairs = list(zip(a[1:], b[1:]))
    assert pairs and all(x["files"] == y["files"] for x, y in pairs), "the two files score different inputs"
    d_mu = [abs(x["mu"] - y["mu"]) for x, y in pairs]
    d_sigma = [abs(x["sigma"] - y["sigma"]) / max(abs(y["sigma"]), 1e-12) for x, y in pairs]
    spread = max(x["mu"] for x, _ in pairs) - min(x["mu"] for x, _ in pairs)
    return {"inputs": len(pairs), "max_abs_mu_diff": max(d_mu), "max_rel_sigma_diff": max(d_sigma),
            "mu_spread": spread, "identical": all(x["mu"] == y["mu"] and x["sigma"] == y["sigma"] for x, y in pairs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("groups")
    g.add_argument("out", type=Path)
    g.add_argument("--n", type=int, default=4)
    for name in ("plain", "jrm"):
        p = sub.add_parser(name)
        p.add_argument("export", type=Path)
        p.add_argument("groups", type=Path)
        p.add_argument("out", type=Path)
        p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "groups":
        write_groups(a.out, a.n)
    elif a.cmd in ("plain", "jrm"):
        scores = (score_plain if a.cmd == "plain" else score_jrm)(a.export, a.groups, a.dtype)
        a.out.write_text(json.dumps(scores, indent=1))
        print(json.dumps(scores[-1]))
    else:
        print(json.dumps(compare(json.loads(a.a.read_text()), json.loads(a.b.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
