"""Our kernels/ directory must not look like the Hugging Face `kernels` hub library to transformers."""
import subprocess
import sys


def test_transformers_does_not_see_a_kernels_library(tmp_path):
    code = (
        "import importlib.util, jrm_kernels\n"
        "from transformers.utils import import_utils as iu\n"
        "assert importlib.util.find_spec('kernels') is None, 'a top-level kernels package is installed'\n"
        "assert iu._is_package_available('kernels') is False or iu._is_package_available('kernels')[0] is False\n"
        "assert not iu.is_kernels_available()\n"
        "print('ok', jrm_kernels.__name__)\n"
    )
    # run outside the repo so only the installed distribution is visible (not the checkout on sys.path)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok jrm_kernels" in out.stdout


def test_console_scripts_declared():
    from importlib.metadata import entry_points

    names = {e.name for e in entry_points(group="console_scripts")}
    for n in ("jrm-prep", "jrm-train", "jrm-export", "jrm-eval", "jrm-serve", "jrm-plan"):
        assert n in names
