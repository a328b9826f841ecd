"""An export scored with plain transformers (no jrm_dist importable) + the head's MLP equals
``JointRewardModel.score``: the exported vocabulary holds the trained ``<|reward|>`` embedding.

The plain-transformers code is the README's "Scoring an export without jrm-dist" block, run in a
``python -I`` subprocess whose import system refuses jrm_dist / data_prep / jrm_kernels."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_launch import ROOT, base_overrides, spawn

pytestmark = pytest.mark.timeout(600)

BLOCKER = '''
import importlib.abc, sys
class _NoJrm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jrm_dist", "data_prep", "jrm_kernels"):
            raise ImportError(f"{name} is blocked: this run checks that transformers alone scores an export")
sys.meta_path.insert(0, _NoJrm())
try:
    import jrm_dist  # noqa: F401
    raise SystemExit("jrm_dist is importable")
except ImportError:
    pass
'''


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Scoring an export without jrm-dist", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def plain_score(export: Path, instruction: str, files: list[Path]) -> tuple[float, float]:
    code = readme_snippet()
    for name, value in (("export_dir", str(export)), ("instruction", instruction),
                        ("image_files", [str(f) for f in files])):
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", code, count=1, flags=re.M)
        assert n == 1, name
    p = subprocess.run([sys.executable, "-I", "-c", BLOCKER + code], cwd=export.parent, capture_output=True,
                       text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"mu=(\S+) sigma=(\S+)", p.stdout)
    return float(m.group(1)), float(m.group(2))


def jrm_score(export: Path, instruction: str, files: list[Path]) -> tuple[float, float]:
    from PIL import Image

    from jrm_dist.eval.common import Scorer

    scorer = Scorer(str(export), batch_size=1, device="cpu")
    ims = [Image.open(f).convert("RGB") for f in files]
    s = scorer.score_encoded([scorer.encode(instruction, ims[:-1], ims[-1:])])[0]
    return s.mu, s.sigma


def group_files(tmp: Path, seed: int = 1, index: int = 3) -> tuple[str, list[Path]]:
    from data_prep.synthetic import make_group

    rec, imgs = make_group(seed, index)
    names = rec["source_images"] + rec["candidates"][0]["images"]
    files = []
    for n in names:
        (tmp / n).write_bytes(imgs[n])
        files.append(tmp / n)
    return rec["instruction"], files


def check_export(export: Path, tmp: Path) -> tuple[float, float]:
    from safetensors.torch import load_file

    jcfg = json.loads((export / "jrm_config.json").read_text())
    token = load_file(str(export / "reward_head.safetensors"))["token.weight"]
    vocab = {}
    for f in export.glob("model*.safetensors"):
        vocab.update({k: v for k, v in load_file(str(f)).items() if k.endswith("embed_tokens.weight")
                      and "visual" not in k})
    (row,) = [v[jcfg["reward_token_id"]] for v in vocab.values()]
    assert torch.equal(row.float(), token), "exported <|reward|> vocabulary row != trained token embedding"
    instruction, files = group_files(tmp)
    plain = plain_score(export, instruction, files)
    ours = jrm_score(export, instruction, files)
    assert plain == ours, (plain, ours)  # exactly: the same fp32 computation
    print(f"[export-plain] {export.name}: plain mu={plain[0]!r} sigma={plain[1]!r}  jrm mu={ours[0]!r} "
          f"sigma={ours[1]!r}  |dmu|={abs(plain[0] - ours[0]):.3g}")
    return plain


def initial_token(tiny_backbone: str) -> torch.Tensor:
    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import RewardProcessor

    proc = RewardProcessor.from_pretrained(tiny_backbone)
    return JointRewardModel.from_backbone(tiny_backbone, proc.reward_token_id, head_hidden=8).reward_head.token.weight


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
@pytest.mark.launch
def test_zero3_export_scores_identically_with_plain_transformers(tiny_backbone, synthetic_shards, tmp_path, lora,
                                                                 request):
    """A short real ZeRO-3 run (the token embedding moves), its end-of-training export (jrm-export's code,
    with the LoRA merge for lora=4: the run shared with test_train_optim), scored by transformers alone vs by
    jrm_dist."""
    from safetensors.torch import load_file

    if lora:
        out = request.getfixturevalue("lora_zero3_run")
    else:
        out = tmp_path / "run"
        r = spawn(base_overrides(tiny_backbone, synthetic_shards, out, steps=3,
                                 **{"train.save_every": 0, "tracking.enabled": "false", "data.eval_shards": "",
                                    "optim.head_lr": "1e-2"}))
        assert r.codes == [0, 0], r.log
    export = out / "export"
    trained = load_file(str(export / "reward_head.safetensors"))["token.weight"]
    moved = float((trained - initial_token(tiny_backbone)).abs().max())
    print(f"[export-plain] lora={lora}: reward-token embedding moved by max |d| = {moved:.4g}")
    assert moved > 1e-3
    check_export(export, tmp_path)


def test_save_pretrained_writes_the_trained_reward_row(jrm_checkpoint, tmp_path):
    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import RewardProcessor

    model = JointRewardModel.from_pretrained(jrm_checkpoint).eval()
    with torch.no_grad():  # as if training had moved it
        model.reward_head.token.weight.add_(torch.randn(model.reward_head.token.weight.shape,
                                                        generator=torch.Generator().manual_seed(0)))
    out = tmp_path / "saved"
    model.save_pretrained(out, RewardProcessor.from_pretrained(jrm_checkpoint))
    check_export(out, tmp_path)
    # the live model is untouched (its vocabulary row still holds its own value)
    emb = model.backbone.get_input_embeddings().weight[model.reward_token_id]
    assert not torch.equal(emb, model.reward_head.token.weight)


def test_save_pretrained_with_tied_embeddings(tiny_backbone, tmp_path):
    """Tied input/output embeddings (e.g. Qwen2.5-VL-3B): the saved shared matrix carries the trained row,
    plain transformers re-ties it on load and still scores exactly as JRM."""
    import shutil

    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import RewardProcessor

    tied = tmp_path / "tied-backbone"
    shutil.copytree(tiny_backbone, tied)
    cfg = json.loads((tied / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(cfg))
    proc = RewardProcessor.from_pretrained(str(tied))
    model = JointRewardModel.from_backbone(str(tied), proc.reward_token_id, head_hidden=16).eval()
    assert model.backbone.get_input_embeddings().weight is model.backbone.get_output_embeddings().weight
    with torch.no_grad():
        model.reward_head.token.weight.add_(0.5)
    model.save_pretrained(tmp_path / "saved", proc)
    check_export(tmp_path / "saved", tmp_path)
