"""The trainer on 2 CPU ranks (torchrun, gloo, ZeRO-3, tiny backbone): partitioning, first-step
equality with a single process on the same global batch, MLflow content, and the export round trip."""
from __future__ import annotations

import json

import pytest
import torch

from train_launch import TINY, mlflow_run, steps

pytestmark = [pytest.mark.timeout(600), pytest.mark.launch]


@pytest.fixture(scope="module")
def run(torchrun_six_steps):
    """One uninterrupted 6-step run with torchrun (the demo's launcher), eval at steps 3 and 6, export
    (conftest.py: shared with test_train_resume as its reference trajectory)."""
    return torchrun_six_steps


def test_zero3_partitions_parameters_across_ranks(run):
    infos = [json.loads((run["out"] / "ranks" / f"rank_{r:05d}.json").read_text()) for r in (0, 1)]
    total = infos[0]["params_total"]
    assert total > 300_000
    assert sum(i["params_local"] for i in infos) == total  # each parameter lives on exactly one rank
    for i in infos:
        assert abs(i["params_local"] - total / 2) / total < 0.02  # ~half each
        # fp32 master + 2 AdamW moments (12 B) for this rank's partition only
        assert i["optimizer_state_bytes"] == pytest.approx(12 * i["params_local"], rel=0.02)


def test_first_step_loss_matches_single_process_on_same_global_batch(run, tiny_backbone):
    """Rebuild the model without DeepSpeed, run the union of both ranks' first micro-batches as one batch."""
    from data_prep.synthetic import make_group
    from jrm_dist.config import load_config
    from jrm_dist.data.collate import Collator, encode_group
    from jrm_dist.engine import build_model
    from jrm_dist.objective import joint_objective
    from jrm_dist.processing import RewardProcessor

    cfg = load_config(TINY, run["overrides"])
    proc = RewardProcessor.from_pretrained(cfg.model.name, max_pixels=cfg.data.max_pixels,
                                           min_pixels=cfg.data.min_pixels, max_length=cfg.data.max_length)
    model = build_model(cfg, proc.reward_token_id, None)
    rec = steps(run["out"])
    for step in (1,):
        keys = [k for rank_keys in rec[step]["keys"] for k in rank_keys]
        assert len(keys) == 4 and len(set(keys)) == 4
        groups = []
        for k in keys:
            _, seed, idx = k.split("-")
            groups.append(encode_group(proc, *make_group(int(seed), int(idx)), rank_by=cfg.data.rank_by))
        batch = Collator(proc)(groups)
        with torch.no_grad():
            obj = joint_objective(model(batch), batch, cfg.loss, step - 1)
        assert rec[step]["loss/total"] == pytest.approx(float(obj["loss"]), rel=1e-5, abs=1e-6)
        assert rec[step]["loss/rank"] == pytest.approx(float(obj["rank"]), rel=1e-5, abs=1e-6)
        assert rec[step]["loss/lm"] == pytest.approx(float(obj["lm"]), rel=1e-5, abs=1e-6)


def test_every_sample_seen_once_per_epoch_slice(run):
    rec = steps(run["out"])
    assert sorted(rec) == [1, 2, 3, 4, 5, 6]
    keys = [k for r in rec.values() for rank_keys in r["keys"] for k in rank_keys]
    assert len(keys) == 24 and len(set(keys)) == 24  # 6 steps x 2 ranks x 2 groups, no repeats within an epoch


def test_mlflow_run_holds_the_metrics(run):
    client, runs = mlflow_run(run["out"])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    for key in ("alpha", "loss/total", "loss/rank", "loss/lm", "train/accuracy", "mu/mean", "mu/std", "sigma/mean",
                "grad_norm", "lr", "tokens_per_s", "samples_per_s", "peak_mem_mb", "skipped_steps",
                "corrupt_samples", "eval/accuracy", "eval/effective_rank", "eval/log_likelihood", "eval/brier",
                "eval/ece", "eval/sel_acc_25", "eval/sel_acc_50", "eval/sel_acc_100"):
        assert key in r.data.metrics, key
    hist = client.get_metric_history(r.info.run_id, "loss/total")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(r.info.run_id, "eval/effective_rank")] == [3, 6]
    assert 1.0 <= r.data.metrics["eval/effective_rank"] <= 64.0
    assert r.data.params["loss.alpha"] == "0.3"
    arts = {a.path for a in client.list_artifacts(r.info.run_id)} | \
        {a.path for a in client.list_artifacts(r.info.run_id, "eval")}
    assert "config.yaml" in arts and "eval/spectrum_step_00000006.png" in arts
    assert "eval/reliability_step_00000006.png" in arts


def test_eval_calibration_follows_from_the_stored_scores(run):
    """eval/step_*.json: the calibration metrics equal P(winner beats loser) recomputed from the stored
    (mu, sigma) of every decided pair under the run's loss (thurstone, ties ignored: no margin); the
    export records that loss so jrm-eval and jrm-serve use the same P(A beats B)."""
    from jrm_dist.metrics import calibration_metrics, win_probability

    ev = json.loads((run["out"] / "eval" / "step_00000006.json").read_text())
    assert ev["calibration"]["rank_mode"] == "thurstone" and ev["calibration"]["tie_margin"] == 0.0
    mw, sw, ml, sl = [], [], [], []
    for r in ev["scores"].values():
        assert len(r["sigma"]) == len(r["mu"]) and all(s > 0 for s in r["sigma"])
        for w, l, t in r["pairs"]:
            if not t:
                mw.append(r["mu"][w]), sw.append(r["sigma"][w]), ml.append(r["mu"][l]), sl.append(r["sigma"][l])
    p = win_probability(mw, sw, ml, sl, "thurstone")
    want = calibration_metrics(p, torch.ones_like(p))
    assert want["n"] == ev["calibration"]["pairs"] > 0
    for k in ("log_likelihood", "brier", "ece", "sel_acc_25", "sel_acc_50", "sel_acc_100"):
        assert ev[f"eval/{k}"] == pytest.approx(want[k], abs=1e-9), k
    assert ev["eval/sel_acc_100"] == pytest.approx(ev["eval/accuracy"])
    assert sum(b["count"] for b in ev["calibration"]["bins"]) == want["n"]
    assert (run["out"] / "eval" / "reliability_step_00000006.png").stat().st_size > 1000
    jcfg = json.loads((run["out"] / "export" / "jrm_config.json").read_text())
    assert jcfg["loss"] == {"rank_mode": "thurstone", "ties": "ignore", "tie_margin": 0.5}


def test_export_scores_identically_to_the_live_engine(run):
    """The end-of-training export vs the scores the ZeRO-3 engine produced in the final eval."""
    from data_prep.synthetic import make_group
    from jrm_dist.data.collate import Collator, encode_group
    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import RewardProcessor

    exp = run["out"] / "export"
    assert f"consolidated HF export: {exp}" in run["stdout"]
    model = JointRewardModel.from_pretrained(exp).eval()
    proc = RewardProcessor.from_pretrained(str(exp), max_pixels=3136, min_pixels=784, max_length=512)
    live = json.loads((run["out"] / "eval" / "step_00000006.json").read_text())["scores"]
    assert len(live) == 16
    col = Collator(proc)
    for key, r in live.items():
        _, seed, idx = key.split("-")
        batch = col([encode_group(proc, *make_group(int(seed), int(idx)))])
        mu, sigma = model.score(batch)
        torch.testing.assert_close(mu, torch.tensor(r["mu"]), rtol=1e-5, atol=1e-5)


def test_jrm_export_cli_bf16_and_bounded_shards(run, tmp_path):
    from jrm_dist.export import main
    from jrm_dist.model import JointRewardModel

    out = tmp_path / "hf"
    step4 = run["out"] / "checkpoints" / "step_00000004"
    assert main(["--checkpoint", str(step4), "--out", str(out), "--dtype", "bf16", "--max-shard-size", "200KB"]) == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert all(s.stat().st_size < 200_000 + 140_000 for s in shards)  # bound + at most one oversized tensor
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    m = JointRewardModel.from_pretrained(out, dtype=torch.bfloat16)
    assert next(m.backbone.parameters()).dtype == torch.bfloat16
    assert json.loads((out / "jrm_config.json").read_text())["exported_from"]["step"] == 4
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 2
