"""jrm-eval rank over synthetic shards: effective rank of reward-token features equals the metric on
features computed directly, a checkpoint with a collapsed representation ranks lower, the spectrum PNG
and the comparison table are written."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from jrm_dist.eval import cli
from jrm_dist.data.schema import group_ranking
from jrm_dist.eval.common import Scorer
from jrm_dist.losses import ranking_to_pairs
from jrm_dist.metrics import calibration_metrics, effective_rank, win_probability

KEEP = 1  # dims the collapsed checkpoint keeps: its features have rank 1, effective rank 1


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_prep.cli import main as prep

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    assert prep(["synthetic", "--out", str(out), "--groups", "6", "--seed", "3", "--k", "3", "--quiet"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def collapsed_checkpoint(jrm_checkpoint, tmp_path_factory):
    """Same model with the final norm zeroed beyond KEEP dims: its reward-token features have rank <= KEEP."""
    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import RewardProcessor

    model = JointRewardModel.from_pretrained(jrm_checkpoint)
    with torch.no_grad():
        model.backbone.model.language_model.norm.weight[KEEP:] = 0
    out = tmp_path_factory.mktemp("collapsed") / "ckpt"
    model.save_pretrained(out, RewardProcessor.from_pretrained(jrm_checkpoint))
    return str(out)


def test_rank_compares_checkpoints(shards, jrm_checkpoint, collapsed_checkpoint, tmp_path):
    out = tmp_path / "rank"
    assert cli.main(["rank", "--model", jrm_checkpoint, "--model", collapsed_checkpoint, "--label", "jrm",
                     "--label", "collapsed", "--shards", shards, "--out", str(out), "--batch-size", "5",
                     "--device", "cpu"]) == 0
    res = json.loads((out / "rank.json").read_text())
    first, second = res["models"]
    assert res["groups"] == 6 and first["n_features"] == 18 and first["dim"] == 64

    # the same number from features computed here, candidate by candidate
    from jrm_dist.data.collate import EncodedGroup
    from jrm_dist.eval.rank import shard_groups
    from jrm_dist.processing import open_image

    scorer = Scorer(jrm_checkpoint, device="cpu")
    feats, mw, sw, ml, sl = [], [], [], [], []
    for rec, images in shard_groups(shards):
        src = [open_image(images[n]) for n in rec["source_images"]]
        scores = []
        for c in rec["candidates"]:
            enc = scorer.encode(rec["instruction"], src, [open_image(images[n]) for n in c["images"]], c.get("text"))
            feats.append(scorer.model.features(scorer.collator([EncodedGroup("g", [enc], [], [], [])])))
            scores.append(scorer.score_encoded([enc])[0])  # the inference path, one candidate at a time
        for w, l, t in zip(*ranking_to_pairs(group_ranking(rec, "overall"))):
            if not t:
                mw.append(scores[w].mu), sw.append(scores[w].sigma), ml.append(scores[l].mu), sl.append(scores[l].sigma)
    assert first["effective_rank"] == pytest.approx(effective_rank(torch.cat(feats)), rel=1e-4)
    # calibration of P(winner beats loser) on the decided pairs, from the reward head's (mu, sigma)
    p = win_probability(mw, sw, ml, sl, "thurstone")
    want = calibration_metrics(p, torch.ones_like(p))
    cal = first["calibration"]
    assert cal["n"] == want["n"] == len(mw) > 0 and cal["rank_mode"] == "thurstone"
    for k in ("log_likelihood", "brier", "ece", "sel_acc_25", "sel_acc_50", "sel_acc_100"):
        assert cal[k] == pytest.approx(want[k], abs=1e-5), k
    for i in (0, 1):
        with Image.open(out / f"reliability_{i}.png") as im:
            assert im.format == "PNG"

    assert second["effective_rank"] == pytest.approx(1.0) and first["effective_rank"] > 1.5
    assert second["ratio_vs_first"] == pytest.approx(second["effective_rank"] / first["effective_rank"])
    assert sum(s > 1e-4 * second["singular_values"][0] for s in second["singular_values"]) <= KEEP
    with Image.open(out / "spectrum.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    md = (out / "rank.md").read_text()
    assert "| jrm |" in md and "| collapsed |" in md and "| ECE |" in md


def test_rank_rejects_mismatched_labels(shards, jrm_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="2 labels for 1 models"):
        cli.main(["rank", "--model", jrm_checkpoint, "--label", "a", "--label", "b", "--shards", shards,
                  "--out", str(tmp_path)])
