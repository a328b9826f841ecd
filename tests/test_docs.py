"""The repository is self-contained: no tracked file points at developer-only notes outside it, and
every relative link in the Markdown docs resolves to a tracked file."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# built from parts so this file does not match itself
OUTSIDE = re.compile(r"\.\./" + "shared" + r"|" + "shared" + r"/(DESIGN|MACHINE_NOTES|BENCHMARK_FORMATS)")


def tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def test_no_tracked_file_references_notes_outside_the_repository():
    hits = []
    for rel in tracked():
        p = ROOT / rel
        if not p.is_file():
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{rel}:{i}: {ln.strip()}" for i, ln in enumerate(text.splitlines(), 1) if OUTSIDE.search(ln)]
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_markdown_links_resolve_inside_the_repository():
    files = set(tracked())
    assert {"docs/DESIGN.md", "docs/BENCHMARKS.md"} <= files
    broken = []
    for rel in sorted(f for f in files if f.endswith(".md")):
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", (ROOT / rel).read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (ROOT / rel).parent / target
            if not path.exists() or ROOT.resolve() not in path.resolve().parents:
                broken.append(f"{rel}: {target}")
    assert not broken, "broken or outside links:\n" + "\n".join(broken)
