"""Side-by-side CPU benchmark of the jrm_kernels losses against their baselines, in one run.

(a) Gaussian rank loss fwd+bwd (jrm_kernels, CPU path) vs the EditReward/HPSv3-style 1000-sample Monte-Carlo
    loss (jrm_dist.losses.mc_bt_loss, a re-implementation from its formula): time ratio, and the spread of the
    MC estimate around the exact expectation that ``bt_expected`` computes.
(b) Fused linear + masked CE fwd+bwd vs full-logits ``F.cross_entropy`` (hidden @ W^T for all T tokens, then
    CE with ignore_index) at Qwen2.5-VL head sizes. Each method runs in its own subprocess; peak memory is the
    RSS high-water mark (VmHWM, reset through /proc/self/clear_refs) above the RSS after the inputs and the
    gradient buffers exist, so it counts what the loss itself allocates. T is halved until the naive run fits
    ``--mem-budget-gb``.

    python bench/bench_losses.py                       # full sizes (minutes)
    python bench/bench_losses.py --small               # a quick check
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from _result import emit  # bench/ is sys.path[0] when run as a script

GIB = 1 << 30


# ---- (a) rank loss ------------------------------------------------------------------------------------------

def bench_rank(n_cand: int, n_pairs: int, n_samples: int, repeats: int, threads: int) -> None:
    import jrm_kernels
    from jrm_dist.losses import mc_bt_loss

    torch.set_num_threads(threads)  # same for both; small tensors gain nothing from intra-op threads

    g = torch.Generator().manual_seed(0)
    mu0 = torch.randn(n_cand, generator=g)
    lv0 = torch.randn(n_cand, generator=g) * 0.5
    win = torch.randint(0, n_cand, (n_pairs,), generator=g)
    lose = (win + torch.randint(1, n_cand, (n_pairs,), generator=g)) % n_cand

    def run(fn):
        mu, lv = mu0.clone().requires_grad_(True), lv0.clone().requires_grad_(True)
        loss = fn(mu, lv)
        loss.backward()
        return loss.item()

    fns = {
        "jrm_kernels bt_expected (GH-20)": lambda mu, lv: jrm_kernels.gaussian_rank_loss(mu, lv, win, lose,
                                                                                       mode="bt_expected"),
        "jrm_kernels thurstone": lambda mu, lv: jrm_kernels.gaussian_rank_loss(mu, lv, win, lose),
        f"MC BT, {n_samples} samples": lambda mu, lv: mc_bt_loss(mu, lv, win, lose, n_samples=n_samples),
    }
    times = {}
    for name, fn in fns.items():
        run(fn)  # warm-up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(fn)
            ts.append(time.perf_counter() - t0)
        times[name] = min(ts)  # min: the machine is shared, the other repeats measure the neighbours
    for name, key in (("jrm_kernels bt_expected (GH-20)", "bt_expected"), ("jrm_kernels thurstone", "thurstone")):
        emit(f"rank_loss_fwd_bwd_{key}_vs_mc{n_samples}", times[name] * 1e3,
             times[f"MC BT, {n_samples} samples"] * 1e3, "ms", False,
             note=f"{n_cand} candidates, {n_pairs} pairs, {threads} thread(s), best of {repeats}")
    exact = run(fns["jrm_kernels bt_expected (GH-20)"])
    mc = [mc_bt_loss(mu0, lv0, win, lose, n_samples=n_samples, generator=torch.Generator().manual_seed(s)).item()
          for s in range(20)]
    base = times[f"MC BT, {n_samples} samples"]
    print(f"\n(a) Gaussian rank loss fwd+bwd, {n_cand} candidates, {n_pairs} pairs, CPU "
          f"({torch.get_num_threads()} threads), best of {repeats}")
    print(f"{'method':34s} {'time ms':>10s} {'speed-up vs MC':>15s}")
    for name, t in times.items():
        print(f"{name:34s} {t * 1e3:10.3f} {base / t:14.1f}x")
    print(f"MC({n_samples}) over 20 seeds: mean {statistics.mean(mc):.6f}, std {statistics.stdev(mc):.2e} "
          f"(min {min(mc):.6f}, max {max(mc):.6f}); exact expectation (bt_expected) {exact:.6f}, "
          f"|MC mean - exact| {abs(statistics.mean(mc) - exact):.1e}")


# ---- (b) LM cross-entropy -----------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def ce_worker(method: str, t: int, hid: int, vocab: int, frac: float, repeats: int) -> None:
    """One method in a fresh process; prints a JSON line."""
    import jrm_kernels

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(t, hid, generator=g).requires_grad_(True)
    weight = (torch.randn(vocab, hid, generator=g) * hid ** -0.5).requires_grad_(True)
    labels = torch.full((t,), -100, dtype=torch.long)
    pos = torch.randperm(t, generator=g)[: max(1, int(t * frac))]
    labels[pos] = torch.randint(0, vocab, (pos.numel(),), generator=g)
    hidden.grad = torch.zeros_like(hidden)  # gradient buffers exist before measuring, for both methods
    weight.grad = torch.zeros_like(weight)

    def step():
        if method == "naive":
            loss = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
        else:
            loss = jrm_kernels.fused_linear_masked_ce(hidden, weight, labels)
        loss.backward()
        return loss.item()

    base = _rss_kib("VmRSS")
    _reset_hwm()
    t0 = time.perf_counter()
    loss = step()
    times = [time.perf_counter() - t0]
    peak = _rss_kib("VmHWM")
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"method": method, "loss": loss, "time_s": statistics.median(times), "times": times,
                      "peak_extra_bytes": (peak - base) * 1024, "peak_total_bytes": peak * 1024,
                      "inputs_bytes": base * 1024}))


def bench_ce(hids, vocab: int, t_req: int, frac: float, budget_gb: float, repeats: int) -> None:
    print(f"\n(b) LM-head cross-entropy fwd+bwd, fp32, V={vocab}, {frac:.0%} of T labelled, CPU "
          f"({torch.get_num_threads()} threads); peak = RSS high-water above inputs + grads, separate processes")
    header = (f"{'H':>5s} {'T':>5s} {'method':28s} {'time s':>8s} {'peak extra MiB':>15s} {'of it: not grads':>17s} "
              f"{'peak total GiB':>15s}")
    rows = []
    for hid in hids:
        t = t_req
        # naive: weight + grad (2 V H) + logits, softmax and logits grad (~3 T V), fp32
        while t > 64 and (2 * vocab * hid + 3 * t * vocab) * 4 > budget_gb * GIB:
            t //= 2
        if t != t_req:
            print(f"H={hid}: T={t_req} would need ~{(2 * vocab * hid + 3 * t_req * vocab) * 4 / GIB:.1f} GiB for "
                  f"the naive loss (budget {budget_gb} GiB): using T={t}")
        res = {}
        for method in ("fused", "naive"):
            out = subprocess.run([sys.executable, __file__, "--ce-worker", method, str(t), str(hid), str(vocab),
                                  str(frac), str(repeats)], capture_output=True, text=True, check=True)
            res[method] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((hid, t, res))
        print(header)
        for method, label in (("naive", "full logits F.cross_entropy"), ("fused", "jrm_kernels fused (CPU)")):
            r = res[method]
            # both methods return fresh dweight / dhidden tensors that autograd adds into the existing .grad:
            # subtracting them leaves what the loss itself holds (logits, softmax, tiles)
            r["work_bytes"] = r["peak_extra_bytes"] - 4 * hid * (vocab + t)
            print(f"{hid:5d} {t:5d} {label:28s} {r['time_s']:8.2f} {r['peak_extra_bytes'] / 2 ** 20:15.1f} "
                  f"{r['work_bytes'] / 2 ** 20:17.1f} {r['peak_total_bytes'] / GIB:15.2f}")
        f, n = res["fused"], res["naive"]
        print(f"      ratio fused/naive: time {f['time_s'] / n['time_s']:.3f}x, peak extra memory "
              f"{f['peak_extra_bytes'] / n['peak_extra_bytes']:.2%} (without the gradient outputs "
              f"{f['work_bytes'] / n['work_bytes']:.2%}), |loss diff| {abs(f['loss'] - n['loss']):.1e}")
        note = f"H={hid} V={vocab} T={t}, {frac:.0%} labelled, fp32"
        emit(f"lm_ce_time_H{hid}", f["time_s"], n["time_s"], "s", False, note=note)
        emit(f"lm_ce_peak_extra_mem_H{hid}", f["peak_extra_bytes"] / 2 ** 20, n["peak_extra_bytes"] / 2 ** 20,
             "MiB", False, note=note + ", RSS high-water above inputs and .grad buffers")
        emit(f"lm_ce_work_mem_H{hid}", f["work_bytes"] / 2 ** 20, n["work_bytes"] / 2 ** 20, "MiB", False,
             note=note + ", peak extra minus the dweight/dhidden outputs")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ce-worker", nargs=6, metavar=("METHOD", "T", "H", "V", "FRAC", "REPEATS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--small", action="store_true", help="small shapes, for a quick check")
    ap.add_argument("--hidden", type=int, nargs="+", default=[3584, 8192])
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--labelled", type=float, default=0.1)
    ap.add_argument("--mem-budget-gb", type=float, default=11.0)
    ap.add_argument("--ce-repeats", type=int, default=1)
    ap.add_argument("--candidates", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--mc-samples", type=int, default=1000)
    ap.add_argument("--rank-threads", type=int, default=1)
    ap.add_argument("--skip-ce", action="store_true")
    args = ap.parse_args(argv)
    if args.ce_worker:
        m, t, h, v, frac, rep = args.ce_worker
        ce_worker(m, int(t), int(h), int(v), float(frac), int(rep))
        return
    if args.small:
        args.hidden, args.vocab, args.tokens = [256], 8192, 512
    threads = torch.get_num_threads()
    bench_rank(args.candidates, args.pairs, args.mc_samples, repeats=10, threads=args.rank_threads)
    torch.set_num_threads(threads)
    if not args.skip_ce:
        bench_ce(args.hidden, args.vocab, args.tokens, args.labelled, args.mem_budget_gb, args.ce_repeats)


if __name__ == "__main__":
    main()
