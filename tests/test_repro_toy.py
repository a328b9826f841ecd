"""The pieces of `make repro-toy`: the pretrained tiny backbone (a very short run: the machinery, not the
90%), the verdict-first rationales and group mix of the synthetic task, the held-out scoring of an export
(per-kind accuracy, effective rank, calibration), and the sweep table's t-intervals."""
from __future__ import annotations

import json
import math

import pytest


def test_short_pretrain_writes_a_loadable_backbone_with_heldout_scores_and_is_reused(tmp_path):
    from jrm_dist.backbones import load_backbone, load_tokenizer
    from jrm_dist.pretrain import EVAL_FILE, pretrain_tiny_backbone

    out = pretrain_tiny_backbone(tmp_path / "pt", steps=3, batch_size=4, hidden=64, layers=2, eval_samples=8,
                                 threads=1)
    res = json.loads((out / EVAL_FILE).read_text())
    assert 0.0 <= res["caption_colour_accuracy"] <= 1.0 and res["steps"] == 3 and res["heldout_samples"] == 8
    assert any(k.startswith("exact/") for k in res) and res["examples"]
    tok = load_tokenizer(str(out))
    for w in ("red", "purple", "grey", "speckled", "centre"):  # caption words are whole tokens
        assert len(tok.tokenize(" " + w)) == 1, w
    model = load_backbone(str(out))
    assert model.config.get_text_config().hidden_size == 64
    stamp = (out / EVAL_FILE).stat().st_mtime_ns
    assert pretrain_tiny_backbone(out, steps=3) == out and (out / EVAL_FILE).stat().st_mtime_ns == stamp


def test_pretrain_samples_describe_the_image():
    import io
    import random

    from PIL import Image

    from jrm_dist.pretrain import COLOUR_WORDS, make_sample

    rng = random.Random(0)
    for _ in range(30):
        s = make_sample(rng)
        im = Image.open(io.BytesIO(s.images[-1])).convert("RGB")
        assert s.colour in COLOUR_WORDS
        if s.kind == "colour":
            assert s.answer == s.colour
        if s.kind == "caption":
            assert f" {s.colour} square" in s.answer
        # the named colour is in the (last) image
        assert COLOUR_WORDS[s.colour] in {c for _, c in im.getcolors(56 * 56)}


def test_verdict_first_rationales_and_default_unchanged():
    from data_prep.synthetic import make_group, rationale_for

    assert rationale_for("red", "blue") == ("The square is now blue; the instruction asked for red, so the edit does "
                                            "not follow it. The image is clean.")
    assert rationale_for("red", "blue", style="verdict_first").startswith("Does not follow: the square is blue, not red")
    assert rationale_for("red", "red", style="verdict_first").startswith("Follows: the square is red")
    with pytest.raises(ValueError, match="rationale style"):
        rationale_for("red", "red", style="nope")
    rec, _ = make_group(0, 3, rationale_style="verdict_first")
    assert all(c["rationale"].split(":")[0] in ("Follows", "Does not follow", "Follows but degraded")
               for c in rec["candidates"])
    assert make_group(0, 3)[0]["candidates"][0]["rationale"] == rationale_for(
        rec["meta"]["asked"], rec["meta"]["colours"][0], rec["candidates"][0]["scores"]["quality_aesthetic"])
    kinds = [make_group(0, i, quality_share=0.0)[0]["meta"]["kind"] for i in range(20)]
    assert set(kinds) == {"colour"}


def test_prep_cli_quality_share_and_style(tmp_path):
    from data_prep.cli import main as prep
    from jrm_dist.repro import _read_groups

    d = tmp_path / "s"
    assert prep(["synthetic", "--out", str(d), "--groups", "12", "--quality-share", "1.0", "--rationale-style",
                 "verdict_first", "--quiet"]) == 0
    recs = [r for r, _ in _read_groups(d)]
    assert len(recs) == 12 and {r["meta"]["kind"] for r in recs} == {"quality"}
    assert recs[0]["candidates"][0]["rationale"].startswith("Follows")
    assert prep(["synthetic", "--out", str(tmp_path / "bad"), "--groups", "2", "--quality-share", "2",
                 "--quiet"]) == 2


def test_evaluate_export_reports_per_kind_accuracy_rank_and_calibration(jrm_checkpoint, synthetic_shards):
    from pathlib import Path

    from jrm_dist.repro import _read_groups, evaluate_export

    res = evaluate_export(Path(jrm_checkpoint), Path(synthetic_shards["eval"]), "thurstone")
    m = res["metrics"]
    kinds = {r["meta"]["kind"] for r, _ in _read_groups(Path(synthetic_shards["eval"]))}
    assert {f"eval/accuracy/{k}" for k in kinds} <= set(m)
    for k in ("eval/accuracy", "eval/effective_rank", "eval/log_likelihood", "eval/brier", "eval/ece",
              "eval/sel_acc_25", "eval/sel_acc_50", "eval/sel_acc_100"):
        assert math.isfinite(m[k]), k
    assert m["eval/pairs"] == 16 and m["eval/groups"] == 16  # K = 2: one decided pair per group
    assert abs(m["eval/sel_acc_100"] - m["eval/accuracy"]) < 1e-9
    assert abs(sum(res["spectrum"]) - 1) < 1e-6


def test_t_interval_and_sweep_table():
    from jrm_dist.report import RunRow, render_sweep, t_interval

    mean, hw, n = t_interval([0.6, 0.7, 0.8])
    assert n == 3 and abs(mean - 0.7) < 1e-12 and abs(hw - 4.303 * 0.1 / math.sqrt(3)) < 1e-9
    assert math.isnan(t_interval([0.5])[1])
    rows = [RunRow(f"r{a}{s}", f"alpha{a}-seed{s}", "e", "bb", a, "thurstone", "FINISHED",
                   {"heldout_acc": 0.5 + a / 2 + s / 100, "acc_colour": 0.5, "eff_rank": 3.0})
            for a in (0.0, 0.3) for s in range(3)]
    md = render_sweep(rows)
    assert "| 0 (rank-only) | 3 |" in md and "| 0.3 | 3 |" in md
    assert f"{100 * (0.65 + 0.01):.1f} ± {100 * 4.303 * 0.01 / math.sqrt(3):.1f}" in md  # alpha 0.3, all


def test_sweep_plots_write_pngs(tmp_path):
    from jrm_dist.report import RunRow, sweep_plots

    rows = [RunRow(f"r{a}{s}", f"alpha{a}-seed{s}", "e", "bb", a, "bt", "FINISHED",
                   {"heldout_acc": 0.6, "acc_colour": 0.5 + s / 10, "acc_quality": 0.7, "eff_rank": 2.0 + a})
            for a in (0.0, 0.5) for s in range(2)]
    paths = sweep_plots(rows, str(tmp_path), tracking_uri=f"sqlite:///{tmp_path / 'none.db'}")
    assert paths and all(p.endswith(".png") and (tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in paths)


def test_probe_export_reports_what_the_reward_token_sees(jrm_checkpoint, synthetic_shards):
    from pathlib import Path

    from jrm_dist.repro import probe_export

    res = probe_export(Path(jrm_checkpoint), Path(synthetic_shards["eval"]))
    for k in ("lm_verdict_accuracy_at_last_prompt_token", "probe_follows_at_reward_token",
              "probe_follows_at_last_prompt_token", "head_pair_accuracy_test_half"):
        assert 0.0 <= res[k] <= 1.0, k
    assert 0 < res["test_candidates"] < res["candidates"] and res["candidates"] % 2 == 0


def test_caption_retention_reads_the_trained_backbone(jrm_checkpoint, tiny_backbone):
    from pathlib import Path

    from jrm_dist.repro import caption_retention

    v = caption_retention(Path(jrm_checkpoint), Path(tiny_backbone), n=8)
    assert 0.0 <= v <= 1.0


def test_curve_sizes_are_nested_prefixes_of_one_data_seed(tmp_path):
    """repro.group_sizes: one training set per size, the first N groups of the data seed (nested), a data dir
    per data seed (a replication on another seed never reuses the first one's shards)."""
    from jrm_dist.repro import REPRO_DEFAULTS, _read_groups, prepare_data, run_name, sizes

    repro = {**REPRO_DEFAULTS, "out": str(tmp_path), "group_sizes": [8, 4], "eval_groups": 4}
    assert sizes(repro) == [4, 8] and sizes({**repro, "group_sizes": []}) == [repro["train_groups"]]
    with pytest.raises(SystemExit, match="group_sizes"):
        sizes({**repro, "group_sizes": [4, 0]})
    trains, ev = prepare_data(repro)
    small = [r["key"] for r, _ in _read_groups(trains[4])]
    big = [r["key"] for r, _ in _read_groups(trains[8])]
    assert len(small) == 4 and big[:4] == small
    other, _ = prepare_data({**repro, "data_seed": 5})
    assert other[4] != trains[4] and [r["key"] for r, _ in _read_groups(other[4])] != small
    assert run_name(0.3, 1) == "alpha0.3-seed1" and run_name(0.3, 1, 64) == "alpha0.3-seed1-n64"


def _curve_rows(acc):
    from jrm_dist.report import RunRow

    return [RunRow(f"r{a}{n}{s}", f"alpha{a}-seed{s}-n{n}", "e", "bb", a, "bt", "FINISHED",
                   {"heldout_acc": acc(a, n) + (s - 1) / 100, "acc_colour": acc(a, n), "acc_quality": 0.9,
                    "eff_rank": 2.0, "caption_kept": 0.5, "ece": 0.1}, train_groups=n)
            for a in (0.0, 0.3) for n in (64, 128, 256, 512, 1024) for s in range(3)]


def test_groups_to_reach_interpolates_in_log_size():
    from jrm_dist.report import groups_to_reach

    curve = {64: 0.5, 128: 0.6, 256: 0.7}
    assert groups_to_reach(curve, 0.6) == 128 and groups_to_reach(curve, 0.4) == 64
    assert abs(groups_to_reach(curve, 0.65) - 2 ** 7.5) < 1e-9
    assert groups_to_reach(curve, 0.71) is None


def test_curve_report_states_the_fewer_groups_factor_with_an_interval(tmp_path):
    from jrm_dist.report import curve_plot, fewer_groups_factor, render_curve

    # JRM's curve is rank-only's shifted by one doubling: it needs 2x fewer groups
    rows = _curve_rows(lambda a, n: 0.5 + 0.05 * (math.log2(n) - 6 + (1 if a else 0)))
    f = fewer_groups_factor(rows, 0.3)
    assert abs(f["factor"] - 2.0) < 1e-9 and f["lo"] <= 2.0 <= f["hi"] and f["n_ref"] == 1024
    md = render_curve(rows)
    assert "| 1024 | 0 (rank-only) | 3 |" in md and "JRM needs 2.00× fewer groups to reach it" in md
    # equal curves: no gap (1x); a JRM curve below rank-only everywhere: never reaches it
    assert abs(fewer_groups_factor(_curve_rows(lambda a, n: 0.5 + n / 4096), 0.3)["factor"] - 1.0) < 1e-9
    assert fewer_groups_factor(_curve_rows(lambda a, n: 0.5 + n / 4096 - (0.2 if a else 0)), 0.3)["factor"] == 0
    png = curve_plot(rows, str(tmp_path))
    assert png.endswith("data_efficiency_curve.png") and (tmp_path / "data_efficiency_curve.png").stat().st_size > 1000


def test_repro_diag_runs_the_trainer_pieces_and_the_frozen_head_comparison(tiny_backbone, synthetic_shards):
    """jrm_dist.repro_diag: a short in-process run (step-0 and final read-outs) and the frozen-head comparison."""
    from pathlib import Path

    import yaml

    from jrm_dist.repro_diag import ROOT, frozen_head_runs, run

    cfg = yaml.safe_load((ROOT / "configs" / "repro_curve.yaml").read_text())
    cfg["model"]["name"] = tiny_backbone
    train, ev = Path(synthetic_shards["train"]), Path(synthetic_shards["eval"])
    res = run(cfg, train, ev, steps=2, eval_every=2, seed=0, log=lambda s: None)
    assert [r["step"] for r in res["curve"]] == [0, 2]
    for row in res["curve"]:
        assert 0 <= row["accuracy"] <= 1 and row["effective_rank_centred"] >= 1 and row["pair_spread"] >= 0
    out = frozen_head_runs(cfg, train, ev, steps=2, pairs_per_step=4, lr=1e-2, seed=0, log=lambda s: None)
    assert set(out) == {"none", "standardize"} and out["none"][-1]["step"] == 2
