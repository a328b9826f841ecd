"""Damaged and missing data in real 2-rank runs: a missing data.train_shards fails before the model is
built, naming the key; data.verify refuses a changed shard; over one epoch of damaged shards the trained
keys are exactly the manifest's keys minus the counted corrupt records (corrupt_samples in
final_metrics.json); beyond data.max_corrupt_fraction the run stops with an error."""
from __future__ import annotations

import json
import shutil

import pytest

from jrm_dist.train import ABORT_EXIT_CODE
from test_loader import damage_shards
from train_launch import base_overrides, spawn, steps

pytestmark = [pytest.mark.timeout(900), pytest.mark.launch]


@pytest.fixture(scope="module")
def damaged_train(synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged") / "train"
    shutil.copytree(synthetic_shards["train"], out)
    info = damage_shards(str(out))
    return str(out), info


def _ov(backbone, shards, out, train, **extra):
    return base_overrides(backbone, shards, out, steps=100, **{
        "data.train_shards": train, "data.groups_per_batch": 4, "train.epochs": 1, "train.save_every": 0,
        "data.eval_shards": "", **extra})


def test_missing_train_shards_fail_before_the_model_is_built(tiny_backbone, synthetic_shards, tmp_path):
    missing = tmp_path / "no-such-shards"
    r = spawn(_ov(tiny_backbone, synthetic_shards, tmp_path / "run", missing))
    assert r.codes == [ABORT_EXIT_CODE, ABORT_EXIT_CODE], r.log
    assert f"data.train_shards='{missing}' does not exist" in r.logs[0], r.log
    assert "model:" not in r.log  # nothing was built


def test_verify_refuses_a_changed_shard(tiny_backbone, synthetic_shards, damaged_train, tmp_path):
    train, _ = damaged_train
    r = spawn(_ov(tiny_backbone, synthetic_shards, tmp_path / "run", train, **{"data.verify": "true"}))
    assert r.codes == [ABORT_EXIT_CODE, ABORT_EXIT_CODE], r.log
    assert "data.verify: 4 shard(s) differ from the manifest" in r.logs[0] and "sha256" in r.logs[0], r.log
    assert "model:" not in r.log


def test_one_epoch_of_damaged_shards_trains_every_good_record(tiny_backbone, synthetic_shards, damaged_train,
                                                               tmp_path):
    train, info = damaged_train
    out = tmp_path / "run"
    r = spawn(_ov(tiny_backbone, synthetic_shards, out, train, **{"data.max_corrupt_fraction": 0.3}))
    assert r.codes == [0, 0], r.log
    manifest = {f"syn-0-{i:08d}" for i in range(64)}
    rec = steps(out)
    trained = {k for s in rec.values() for rank_keys in s["keys"] for k in rank_keys}
    assert trained == manifest - info["lost"]  # the manifest's keys minus the counted corrupt ones
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["corrupt_samples"] == info["counted"]
    counted = [ln for lg in r.logs for ln in lg.splitlines() if "skipped corrupt record:" in ln]
    assert len(counted) == info["counted"]
    print(f"trained keys {len(trained)} = manifest {len(manifest)} - lost {len(info['lost'])}; "
          f"corrupt_samples {final['corrupt_samples']} (incl. 1 stray member, not a manifest key)")


def test_too_many_corrupt_records_stop_the_run(tiny_backbone, synthetic_shards, damaged_train, tmp_path):
    train, _ = damaged_train
    out = tmp_path / "run"
    r = spawn(_ov(tiny_backbone, synthetic_shards, out, train, **{"data.max_corrupt_fraction": 0.05}))
    assert r.codes == [ABORT_EXIT_CODE, ABORT_EXIT_CODE], r.log
    assert "> data.max_corrupt_fraction=0.05" in r.logs[0], r.log
    assert not (out / "export").exists()
