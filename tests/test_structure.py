"""The house rules that keep the code easy to change: kernels/ (jrm_kernels) is a leaf that needs only torch and
triton, so the kernels and the fp32 reference are two implementations the tests compare; the modules of jrm_dist
and data_prep import each other one way only (no cycle, lazy imports included); no path of one machine."""
from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jrm_dist", "data_prep")


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (at the top or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _module_graph() -> dict[str, set[str]]:
    mods = {}
    for top in PACKAGES:
        for p in (ROOT / top).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for name, p in mods.items():
        package = name if p.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for target in _imports(p, package):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_modules_import_each_other_one_way_only():
    graph = _module_graph()
    assert "jrm_dist.pretrain" in graph and "jrm_dist.backbones" in graph
    assert "jrm_dist.pretrain" not in graph["jrm_dist.backbones"]  # pretrain builds on backbones, not back
    assert _cycles(graph) == []


def test_cycle_finder_sees_a_cycle_through_a_lazy_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_kernels_are_a_leaf_needing_only_torch_and_triton():
    allowed = set(sys.stdlib_module_names) | {"torch", "triton"}
    bad = []
    for p in sorted((ROOT / "kernels").glob("*.py")):
        for name in _imports(p, "jrm_kernels"):
            top = name.split(".")[0]
            if top not in allowed and top != "jrm_kernels":
                bad.append(f"kernels/{p.name}: import {name}")
    assert not bad, "\n".join(bad)


def test_kernels_run_with_jrm_dist_unimportable(tmp_path):
    """The tree's kernels/ under its package name, in a process where importing jrm_dist fails."""
    (tmp_path / "jrm_kernels").symlink_to(ROOT / "kernels")
    code = (
        "import sys\n"
        "sys.modules['jrm_dist'] = None; sys.modules['data_prep'] = None\n"
        "import torch, jrm_kernels\n"
        "mu = torch.tensor([0.3, -0.2, 1.0], requires_grad=True); lv = torch.zeros(3, requires_grad=True)\n"
        "w, l, t = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 2]), torch.tensor([False, False, True])\n"
        "for mode in ('thurstone', 'bt_expected', 'bt'):\n"
        "    loss = jrm_kernels.gaussian_rank_loss(mu, lv, w, l, t, mode=mode, backend='torch')\n"
        "    loss.backward()\n"
        "    assert torch.isfinite(loss) and torch.isfinite(mu.grad).all(), mode\n"
        "print('leaf ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "leaf ok" in r.stdout, r.stderr[-3000:]


def test_two_gauss_hermite_rules_agree_and_integrate_exactly():
    """The kernels' Golub–Welsch rule against the reference's (numpy) rule, and both against the exact moments
    E[x^2k] = (2k - 1)!! / 2^k of N(0, 1/2) for degree < 40."""
    from jrm_dist.losses import GH_W as ref_w, GH_X as ref_x
    from jrm_kernels._rules import GH_ORDER, gauss_hermite

    x, w = (np.array(v) for v in gauss_hermite(GH_ORDER))
    assert len(x) == len(ref_x) == GH_ORDER
    np.testing.assert_allclose(x, ref_x, rtol=0, atol=1e-13)
    np.testing.assert_allclose(w, ref_w, rtol=1e-12, atol=0)
    for k in range(20):
        exact = math.prod(range(1, 2 * k, 2)) / 2 ** k
        for nodes, weights in ((x, w), (np.array(ref_x), np.array(ref_w))):
            assert abs(float(np.sum(weights * nodes ** (2 * k))) - exact) <= 1e-10 * max(exact, 1.0), k
    with pytest.raises(ValueError, match="order"):
        gauss_hermite(0)


@pytest.mark.parametrize("ties", ["model", "ignore"])
@pytest.mark.parametrize("labels", ["none", "mixed", "all_false"])
def test_kernels_and_reference_apply_the_same_tie_rule(ties, labels):
    from jrm_dist.losses import resolve_ties as ref_rule
    from jrm_kernels._rules import resolve_ties as kernel_rule

    win, lose = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0])
    tie = {"none": None, "mixed": torch.tensor([True, False, True, False]),
           "all_false": torch.zeros(4, dtype=torch.bool)}[labels]
    a, b = ref_rule(win, lose, tie, ties, 0.7), kernel_rule(win, lose, tie, ties, 0.7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[3] == b[3]
    assert (a[2] is None) == (b[2] is None) and (a[2] is None or torch.equal(a[2], b[2]))
    if tie is not None and ties == "model":
        for rule in (ref_rule, kernel_rule):
            with pytest.raises(ValueError, match="tie_margin"):
                rule(win, lose, tie, ties, 0.0)


@pytest.mark.parametrize("bad", [("mc", "model", "mean"), ("bt", "drop", "mean"), ("bt", "model", "max")])
def test_kernels_and_reference_refuse_the_same_options(bad):
    from jrm_dist.losses import check_rank_options as ref_check
    from jrm_kernels._rules import check_rank_options as kernel_check

    for check in (ref_check, kernel_check):
        with pytest.raises(ValueError):
            check(*bad)
    ref_check("bt_expected", "ignore", "none")
    kernel_check("bt_expected", "ignore", "none")


def test_no_tracked_file_holds_a_path_of_one_machine():
    """Interpreters and data live where a machine puts them: scripts take them from the environment (e.g.
    bench/gpu_run.sh's $PYTHON). Markdown examples with $USER placeholders are documentation, not code."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    machine = re.compile(r"(?<![\w.$])/(opt|home|Users|work|root|scratch|mnt)/")
    hits = []
    for rel in (p for p in out.split("\0") if p and not p.endswith(".md")):
        try:
            text = (ROOT / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        hits += [f"{rel}:{i}: {ln.strip()}" for i, ln in enumerate(text.splitlines(), 1) if machine.search(ln)]
    assert not hits, "\n".join(hits)


def test_a_launch_from_a_test_not_marked_launch_fails_naming_it(request):
    """`make test-quick` runs `-m "not launch"`: conftest.py tells train_launch which test runs, and spawn()
    refuses to start jrm-train for a test that is not marked, so the quick loop cannot silently grow launches."""
    import train_launch

    assert train_launch.RUNNING_TEST is request.node and request.node.get_closest_marker("launch") is None
    with pytest.raises(RuntimeError, match=re.escape(request.node.nodeid) + ".*not marked @pytest.mark.launch"):
        train_launch.spawn(["train.max_steps=1"], world=1)
    request.node.add_marker(pytest.mark.launch)
    train_launch.check_marked_launch()  # marked: allowed
