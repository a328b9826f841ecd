"""Sample the resident memory of every jrm-dist process on this machine (``jrm_dist.*`` in its command line)
until stopped: one JSON line per process and sample, with its rank, RSS and anonymous RSS (the part that
cannot be dropped under pressure, unlike pages of mapped checkpoints). ``--summary`` reads such a file back
and prints each process' peak per phase, the phases cut at the times given.

    python bench/rss_monitor.py --out rss.jsonl &          # sample every second
    python bench/rss_monitor.py --summary rss.jsonl --phase load=T0 --phase step=T1 ...
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def _status(pid: str) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _jrm_processes() -> dict[str, tuple[str, str]]:
    """pid -> (module, rank) of the processes running a jrm_dist module."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not argv or b"python" not in Path(argv[0].decode(errors="replace")).name.encode():
                continue  # the shells and srun steps that carry the command line along
            mods = [a.decode() for a in argv if a.startswith(b"jrm_dist.") or a.endswith(b"bench/score_check.py")]
            if not mods or b"jrm_dist.torchrun" in argv:
                continue
            env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
            found[pid] = (mods[0].rsplit("/", 1)[-1], env.get(b"RANK", b"-").decode())
        except (OSError, ValueError):
            continue
    return found


def sample(out: Path, every: float) -> None:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with out.open("a") as f:
        while not stop:
            t = time.time()
            for pid, (mod, rank) in _jrm_processes().items():
                try:
                    st = _status(pid)
                except OSError:
                    continue
                f.write(json.dumps({"t": round(t, 2), "pid": int(pid), "module": mod, "rank": rank,
                                    "rss": st.get("VmRSS", 0), "anon": st.get("RssAnon", 0)}) + "\n")
            f.flush()
            time.sleep(every)


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def peaks(samples: list[dict], t0: float, t1: float, module: str | None = None) -> dict[tuple, dict[str, float]]:
    """(module, rank) -> {"rss", "anon"}: peak GB of the samples taken in [t0, t1] (of one module when given)."""
    out: dict[tuple, dict[str, float]] = {}
    for s in samples:
        if not t0 <= s["t"] <= t1 or (module and s["module"] != module):
            continue
        r = out.setdefault((s["module"], s["rank"]), {"rss": 0.0, "anon": 0.0})
        r["rss"] = max(r["rss"], s["rss"] / 1e9)
        r["anon"] = max(r["anon"], s["anon"] / 1e9)
    return out


def summary(path: Path, phases: list[tuple[str, float]]) -> list[dict]:
    """Peak RSS / anonymous RSS (GB) per (phase, module, rank); a phase runs from its time to the next one's."""
    phases = sorted(phases, key=lambda p: p[1])
    samples = load(path)
    ends = [t for _, t in phases[1:]] + [float("inf")]
    return [{"phase": name, "module": mod, "rank": rank, "rss_gb": v["rss"], "anon_gb": v["anon"]}
            for (name, t0), t1 in zip(phases, ends)
            for (mod, rank), v in sorted(peaks(samples, t0, t1).items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="append samples here until SIGTERM")
    ap.add_argument("--every", type=float, default=1.0)
    ap.add_argument("--summary", type=Path, help="summarise a samples file")
    ap.add_argument("--phase", action="append", default=[], metavar="NAME=UNIX_TIME")
    a = ap.parse_args(argv)
    if a.summary:
        phases = [(p.split("=")[0], float(p.split("=")[1])) for p in a.phase] or [("all", 0.0)]
        for r in summary(a.summary, phases):
            print(f"{r['phase']:<10} {r['module']:<22} rank {r['rank']:<2} peak RSS {r['rss_gb']:6.2f} GB"
                  f"  anonymous {r['anon_gb']:6.2f} GB")
        return 0
    if not a.out:
        ap.error("--out or --summary")
    sample(a.out, a.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
