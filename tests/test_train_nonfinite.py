"""Non-finite training and crash-safe pruning on 2 CPU ranks (real runs, JRM_FAULTS):

* NaN losses on consecutive steps stop the run after ``train.max_consecutive_skips`` with exit 1
  (not the requeue code 75) and no export;
* a learning rate that blows up (finite in the config) ends in skipped steps and the same abort;
* non-finite weights on one rank (ZeRO-3 partition) are caught at the next save: no checkpoint, no
  ``latest``, no export, exit 1;
* SIGKILL in the middle of pruning an old checkpoint leaves only a ``trash.*`` folder (never a
  half-deleted ``step_*``), which the resumed run sweeps."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from jrm_dist.train import ABORT_EXIT_CODE, REQUEUE_EXIT_CODE
from train_launch import base_overrides, spawn, steps

pytestmark = pytest.mark.timeout(900)


@pytest.mark.launch
def test_consecutive_skipped_steps_abort_the_run(tiny_backbone, synthetic_shards, tmp_path):
    out = tmp_path / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=8,
                        **{"train.save_every": 0, "train.max_consecutive_skips": 3})
    r = spawn(ov, faults="nan@1:1,nan@3:1,nan@4:1,nan@5:0")  # 1 alone (then a good step), then 3 in a row
    assert r.codes == [ABORT_EXIT_CODE, ABORT_EXIT_CODE] and REQUEUE_EXIT_CODE not in r.codes, r.log
    assert "step 5: 3 steps in a row had a non-finite loss" in r.logs[0], r.log
    assert "train.max_consecutive_skips=3" in r.logs[0]
    rec = steps(out)
    assert sorted(rec) == [1, 2, 3, 4, 5] and rec[5]["skipped_steps"] == 4 and rec[2]["loss/total"] is not None
    assert not (out / "export").exists() and not (out / "final_metrics.json").exists()


@pytest.mark.launch
def test_learning_rate_that_blows_up_stops_the_run(tiny_backbone, synthetic_shards, tmp_path):
    out = tmp_path / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=8,
                        **{"optim.lr": 1e30, "optim.head_lr": 1e30, "train.save_every": 0,
                           "train.max_consecutive_skips": 3})
    r = spawn(ov)  # finite config values; the first update makes every later loss non-finite
    assert r.codes == [ABORT_EXIT_CODE, ABORT_EXIT_CODE], r.log
    assert "3 steps in a row had a non-finite loss" in r.logs[0], r.log
    assert "resume from the last sane checkpoint: none (nothing was saved)" in r.logs[0]
    rec = steps(out)
    assert max(rec) == 4 and rec[1]["loss/total"] is not None and rec[4]["skipped_steps"] == 3
    assert not (out / "export").exists()


@pytest.mark.launch
def test_non_finite_weights_on_one_rank_are_never_checkpointed_or_exported(tiny_backbone, synthetic_shards,
                                                                            tmp_path):
    out = tmp_path / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=6, **{"train.save_every": 2})
    r = spawn(ov, faults="nan_weights@2:1")  # rank 1's ZeRO-3 partition only: the verdict is all-reduced
    assert r.codes == [ABORT_EXIT_CODE, ABORT_EXIT_CODE], r.log
    assert "step 2: the model weights are not finite (on another rank)" in r.logs[0], r.log
    assert "step 2: the model weights are not finite (e.g. " in r.logs[1], r.log
    ck = out / "checkpoints"
    assert not (ck / "latest").exists()
    assert not ck.exists() or not any(p.name.startswith("step_") for p in ck.iterdir())
    assert not (out / "export").exists()


@pytest.mark.launch
def test_kill_while_pruning_leaves_no_half_deleted_checkpoint(tiny_backbone, synthetic_shards, tmp_path):
    out = tmp_path / "run"
    ck = out / "checkpoints"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=6, **{"train.keep_last": 1})
    first = spawn(ov, faults="crash_prune@4:0")
    assert first.codes[0] == -9, first.log
    names = sorted(p.name for p in ck.iterdir())
    # step 4 is complete and named by latest; step 2 was renamed before its deletion began
    assert (ck / "latest").read_text() == "step_00000004"
    assert "step_00000002" not in names and "trash.step_00000002" in names, names
    assert not (ck / "trash.step_00000002" / "COMPLETE").exists() or \
        len(list((ck / "trash.step_00000002").iterdir())) < len(list((ck / "step_00000004").iterdir()))
    second = spawn(ov)
    assert second.codes == [0, 0], second.log
    assert "step_00000004 at step 4" in second.log
    assert "trash.step_00000002 left by an interrupted save or prune" in second.logs[0]
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000006"]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["step"] == 6 and final["corrupt_samples"] == 0

    # DeepSpeed's own zero_to_fp32.py, run the stock way inside the checkpoint folder (no -t ds)
    step = ck / "step_00000006"
    conv = subprocess.run([sys.executable, "zero_to_fp32.py", ".", str(tmp_path / "fp32"), "--safe_serialization"],
                          cwd=step, capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    from safetensors.torch import load_file

    sd = {}
    for f in (tmp_path / "fp32").glob("*.safetensors"):
        sd.update(load_file(f))
    assert any(k.startswith("reward_head.") for k in sd) and any(k.startswith("backbone.") for k in sd), list(sd)[:5]
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_prune_renames_first_and_sweep_removes_leftovers(tmp_path):
    """In-process: a crash (here an exception) after a pruned folder was partly deleted leaves only a
    trash folder that find_resume ignores and sweep() deletes; unfinished saves are swept too."""
    from jrm_dist import checkpoint as ck

    root = ck.ckpt_root(tmp_path)
    for s in (2, 4, 6):
        d = root / ck.step_dir_name(s)
        (d / ck.DS_TAG / "shard").mkdir(parents=True)
        (d / ck.DS_TAG / "shard" / "part.pt").write_bytes(b"x" * 100)
        (d / "trainer_state.json").write_text("{}")
        (d / ck.COMPLETE).write_text(str(s))
    (root / "step_00000008.tmp").mkdir()

    class Crash(Exception):
        pass

    def crash():
        raise Crash
    with pytest.raises(Crash):
        ck.prune(tmp_path, keep_last=1, fault_hook=crash)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step_00000006", "step_00000008.tmp", "trash.step_00000002", "trash.step_00000004"]
    assert ck.find_resume(tmp_path, "auto").name == "step_00000006"
    swept = ck.sweep(tmp_path)
    assert sorted(p.name for p in swept) == ["step_00000008.tmp", "trash.step_00000002",
                                                "trash.step_00000004"]
    ck.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000006"]
