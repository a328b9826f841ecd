"""End to end: the tiny JRM checkpoint scored by ``jrm-eval`` over hand-made files in each released
layout (EditScore save_to_disk folder, TIGER parquet folders, MMRB2 parquet per config). Scores must
equal one-at-a-time offline scoring, each image must be scored once, and the metrics must follow."""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jrm_dist.eval import cli, mmrb2, tiger
from jrm_dist.eval.common import Scorer
from jrm_dist.metrics import calibration_metrics, win_probability

from bench_releases import write_editscore_release

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "grey": (128, 128, 128), "purple": (140, 40, 170)}


def png(colour: str, size=(56, 42)) -> bytes:
    im = Image.new("RGB", size, (225, 225, 225))
    im.paste(COLOURS[colour], (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def img(b: bytes) -> Image.Image:
    return Image.open(io.BytesIO(b)).convert("RGB")


@pytest.fixture(scope="module")
def offline(jrm_checkpoint):
    """mu of one candidate, scored alone (batch of 1): the reference for every batched result."""
    scorer = Scorer(jrm_checkpoint, batch_size=1, device="cpu")

    def mu(instruction, sources, candidates, text=None):
        return scorer.score_encoded([scorer.encode(instruction, sources, candidates, text)])[0].mu

    return mu


# ------------------------------------------------------------------ EditScore release
def _editscore_folder(path):
    src = png("grey")
    rows = [  # (keys, instruction, outputs, task, dimension)
        (["k1", "k2"], "make the square red", [png("red"), png("blue")], "subject-add", "overall"),
        (["k1", "k2"], "make the square red", [png("red"), png("blue")], "subject-add", "prompt_following"),
        (["k3", "k4"], "make the square green", [png("green", (80, 60)), png("yellow", (40, 30))], "color_alter",
         "overall"),
        (["k5", "k5"], "make the square blue", [png("blue"), png("blue")], "extract", "consistency"),  # exact tie
    ]
    write_editscore_release(path, [(k, ins, src, outs, task, dim) for k, ins, outs, task, dim in rows])
    return src, rows


def test_editscore_release_end_to_end(tmp_path, jrm_checkpoint, offline, monkeypatch):
    src, rows = _editscore_folder(tmp_path / "EditReward-Bench")
    assert sorted(p.name for p in (tmp_path / "EditReward-Bench").iterdir()) == [
        "data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    # MLflow: an existing run on a local SQLite store, artifacts under tmp_path
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.create_experiment("eval", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id

    out = tmp_path / "res" / "editscore.json"
    rc = cli.main(["editscore", "--model", jrm_checkpoint, "--data", str(tmp_path / "EditReward-Bench"), "--out",
                   str(out), "--batch-size", "3", "--device", "cpu", "--mlflow-run-id", run_id])
    assert rc == 0
    res = json.loads(out.read_text())
    assert sorted(res["scores"]) == ["k1", "k2", "k3", "k4", "k5"]  # each output scored once, by key

    s = {r[0][j]: (r[1], r[2][j]) for r in rows for j in (0, 1)}
    expect = {}
    for k, (instr, b) in s.items():
        out_im = img(b)
        if out_im.size != img(src).size:  # the protocol resizes the output to the input size first
            out_im = out_im.resize(img(src).size, Image.Resampling.BICUBIC)
        expect[k] = offline(instr, [img(src)], [out_im])
    for k, v in expect.items():
        assert res["scores"][k]["mu"] == pytest.approx(v, abs=1e-5)
    assert len(res["records"]) == 4
    for rec, (keys, *_rest) in zip(res["records"], rows):
        assert rec["key"] == keys and rec["correct"] == (expect[keys[0]] > expect[keys[1]])
    assert res["records"][3]["correct"] is False  # the exact tie is wrong
    acc = res["metrics"]["accuracy"]
    assert acc["overall"]["subject-add"] == float(expect["k1"] > expect["k2"])
    assert acc["overall"]["color_alter"] == float(expect["k3"] > expect["k4"])
    assert acc["consistency"]["extract"] == 0.0
    assert res["metrics"]["average"]["overall"] == pytest.approx(
        (float(expect["k1"] > expect["k2"]) + float(expect["k3"] > expect["k4"])) / 2)
    md = out.with_suffix(".md").read_text()
    assert md.startswith("| Task | PF | Cons. | Overall |") and res["table"] in md

    # calibration of P(preferred beats other): every row is a human-decided pair, output 0 preferred;
    # the fixture checkpoint records no loss, so thurstone: Phi(dmu / sqrt(s0^2 + s1^2))
    assert res["rank"] == {"rank_mode": "thurstone", "tie_margin": 0.0, "source": "default"}
    sig = {k: v["sigma"] for k, v in res["scores"].items()}
    p = torch.tensor([win_probability(expect[r[0][0]], sig[r[0][0]], expect[r[0][1]], sig[r[0][1]]).item()
                      for r in rows])
    want = calibration_metrics(p, torch.ones(len(rows)))
    cal = res["metrics"]["calibration"]
    for k, v in want.items():
        assert cal[k] == pytest.approx(v, abs=1e-5), k
    assert cal["by_dimension"]["overall"]["n"] == 2 and cal["by_dimension"]["consistency"]["sel_acc_100"] == 0.0
    assert "Calibration of P(A beats B) (thurstone, 4 decided pairs)" in md
    assert (tmp_path / "res" / "editscore.reliability.png").stat().st_size > 1000

    run = client.get_run(run_id)
    assert run.data.metrics["eval/editscore/average/overall"] == pytest.approx(res["metrics"]["average"]["overall"])
    assert run.data.metrics["eval/editscore/calibration/ece"] == pytest.approx(cal["ece"])
    assert run.data.metrics["eval/editscore/calibration/by_dimension/overall/log_likelihood"] == pytest.approx(
        cal["by_dimension"]["overall"]["log_likelihood"])
    assert {a.path for a in client.list_artifacts(run_id, "eval")} == {
        "eval/editscore.json", "eval/editscore.md", "eval/editscore.reliability.png"}


def test_editscore_reader_errors_name_file_row_field(tmp_path, capsys, jrm_checkpoint):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"key": [["a", "b"]], "instruction": ["x"], "task_type": ["subject_add"],
                                     "dimension": ["overall"], "input_image": [None], "output_images": [[None, None]]})
    ds.save_to_disk(str(tmp_path / "bad"))
    rc = cli.main(["editscore", "--model", jrm_checkpoint, "--data", str(tmp_path / "bad"), "--out",
                   str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "data-00000-of-00001.arrow row 0 field 'task_type'" in err
    ds.remove_columns(["dimension"]).save_to_disk(str(tmp_path / "bad2"))
    assert cli.main(["editscore", "--model", jrm_checkpoint, "--data", str(tmp_path / "bad2"), "--out",
                     str(tmp_path / "o.json")]) == 2
    assert "missing column(s) ['dimension']" in capsys.readouterr().err


# ------------------------------------------------------------------ TIGER release
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _tiger_folder(root):
    root.mkdir()
    (root / "imgs").mkdir()
    (root / "2pair").mkdir()
    (root / "3pair").mkdir()
    (root / "2pair" / "imgs").mkdir()
    (root / "2pair" / "imgs" / "src.png").write_bytes(png("grey"))  # one source by path, not inline bytes
    src_path = {"bytes": None, "path": "imgs/src.png"}
    inline = lambda c: {"bytes": png(c), "path": None}  # noqa: E731
    two = [  # id, instruction, cand1, cand2, ranking, comparison
        ("1_0", "make the square red", inline("red"), inline("blue"), "A>B", "AvsB"),
        ("2_0", "make the square green", inline("yellow"), inline("green"), "A=B", "AvsB"),
    ]
    three_c = {"A": "blue", "B": "purple", "C": "red"}
    three = [("7_AvsB", "make the square blue", "A", "B", "A>B"), ("7_AvsC", "make the square blue", "A", "C", "C>A"),
             ("7_BvsC", "make the square blue", "B", "C", "B>C")]

    def table(rows, n, src):
        return pa.table({
            "id": [r[0] for r in rows], "instruction": [r[1] for r in rows],
            "source_image": pa.array([src] * len(rows), IMAGE),
            "candidate_1": pa.array([r[2] for r in rows], IMAGE), "candidate_2": pa.array([r[3] for r in rows], IMAGE),
            "ranking": [r[4] for r in rows], "comparison_type": [r[5] for r in rows], "num_candidates": [n] * len(rows),
            "dataset": ["fixture"] * len(rows)})

    pq.write_table(table(two, 2, src_path), root / "2pair" / "train-00000-of-00001.parquet")
    rows3 = [(i, ins, inline(three_c[a]), inline(three_c[b]), rk, f"{a}vs{b}") for i, ins, a, b, rk in three]
    pq.write_table(table(rows3, 3, inline("grey")), root / "3pair" / "train-00000-of-00001.parquet", row_group_size=2)
    return two, three, three_c


def test_tiger_release_end_to_end(tmp_path, jrm_checkpoint, offline):
    two, three, three_c = _tiger_folder(tmp_path / "tiger")
    out = tmp_path / "tiger.json"
    assert cli.main(["tiger", "--model", jrm_checkpoint, "--data", str(tmp_path / "tiger"), "--out", str(out),
                     "--batch-size", "4", "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert len(res["scores"]) == 4 + 3  # the 3pair candidates A, B, C are scored once each
    src = img(png("grey"))
    expected = []
    for i, ins, c1, c2, rk, ct in two:
        m = offline(ins, [src], [img(c1["bytes"])]) - offline(ins, [src], [img(c2["bytes"])])
        expected.append({"subset": "2pair", "group": i.split("_")[0], "h": {"A>B": 1, "A=B": 0}[rk], "m": m})
    mu3 = {k: offline("make the square blue", [src], [img(png(c))]) for k, c in three_c.items()}
    for i, ins, a, b, rk in three:
        h = 1 if rk[0] == a else -1
        expected.append({"subset": "3pair", "group": "7", "h": h, "m": mu3[a] - mu3[b]})
    for got, exp in zip(res["records"], expected):
        assert (got["subset"], got["group"], got["h"]) == (exp["subset"], exp["group"], exp["h"])
        assert got["m"] == pytest.approx(exp["m"], abs=1e-5)
    want = tiger.tiger_metrics(expected)
    got = res["metrics"]
    assert got["subsets"]["3pair"]["group_accuracy"] == want["subsets"]["3pair"]["group_accuracy"]
    assert got["subsets"]["2pair"]["pairwise_accuracy"] == pytest.approx(want["subsets"]["2pair"]["pairwise_accuracy"])
    assert got["overall"]["group_accuracy"] == pytest.approx(want["overall"]["group_accuracy"])
    assert got["overall"]["groups"] == 3
    # calibration of P(candidate_1 beats candidate_2) on the 4 human-decided comparisons (the A=B tie is out)
    cal = got["calibration"]
    assert cal["n"] == 4
    sc = res["scores"]
    dec = [r for r in res["records"] if r["h"] != 0]
    p = win_probability([sc[r["keys"][0]]["mu"] for r in dec], [sc[r["keys"][0]]["sigma"] for r in dec],
                        [sc[r["keys"][1]]["mu"] for r in dec], [sc[r["keys"][1]]["sigma"] for r in dec])
    want = calibration_metrics(p, torch.tensor([float(r["h"] == 1) for r in dec]))
    for k, v in want.items():
        assert cal[k] == pytest.approx(v, abs=1e-9), k
    assert out.with_suffix(".reliability.png").exists()


# ------------------------------------------------------------------ MMRB2
def _mmrb2_folder(root):
    lst = pa.list_(IMAGE)
    inline = lambda c: {"bytes": png(c), "path": None}  # noqa: E731
    configs = {
        "t2i": [("t0", "a red square", None, [inline("red")], [inline("blue")], "", "", "a"),
                ("t1", "a green square", None, [inline("green")], [inline("yellow")], "", "", "B")],
        "edit": [("e0", "<image_1> make the square blue", [inline("grey")], [inline("blue")], [inline("red")], "", "",
                  "A")],
        "interleaved": [("i0", "describe <image_1>", [inline("purple")], [], [inline("purple")],
                         "a purple square", "", "A")],
    }
    for name, rows in configs.items():
        (root / name).mkdir(parents=True)
        t = pa.table({
            "pair_id": [r[0] for r in rows], "prompt_text": [r[1] for r in rows],
            "prompt_images": pa.array([r[2] for r in rows], lst),
            "response_a_images": pa.array([r[3] for r in rows], lst),
            "response_b_images": pa.array([r[4] for r in rows], lst),
            "response_a_text": [r[5] for r in rows], "response_b_text": [r[6] for r in rows],
            "chosen": [r[7] for r in rows], "prompt_source": ["x"] * len(rows),
            "response_a_model": ["m1"] * len(rows), "response_b_model": ["m2"] * len(rows),
            "human_annotations": ["{}"] * len(rows), "prompt_metadata": ["{}"] * len(rows)})
        pq.write_table(t, root / name / "test-00000-of-00001.parquet")
    return configs


def test_mmrb2_release_end_to_end(tmp_path, jrm_checkpoint, offline):
    configs = _mmrb2_folder(tmp_path / "mmrb2")
    out = tmp_path / "mmrb2.json"
    assert cli.main(["mmrb2", "--model", jrm_checkpoint, "--data", str(tmp_path / "mmrb2"), "--out", str(out),
                     "--device", "cpu", "--batch-size", "8"]) == 0
    res = json.loads(out.read_text())
    recs = []
    for name, rows in configs.items():
        for pid, prompt, pimgs, a, b, ta, tb, chosen in rows:
            pim = [img(x["bytes"]) for x in pimgs or []]
            sa = offline(prompt, pim, [img(x["bytes"]) for x in a], ta or None)
            sb = offline(prompt, pim, [img(x["bytes"]) for x in b], tb or None)
            recs.append({"subset": name, "chosen": chosen.upper(), **mmrb2.judgements(sa, sb)})
    assert [(r["subset"], r["chosen"], r["forward"], r["reverse"]) for r in res["records"]] == \
           [(r["subset"], r["chosen"], r["forward"], r["reverse"]) for r in recs]
    want = mmrb2.mmrb2_metrics(recs)
    assert res["metrics"]["overall"]["judgements"] == 8 == want["overall"]["judgements"]
    assert res["metrics"]["overall"]["accuracy"] == want["overall"]["accuracy"]
    assert list(res["metrics"]["subsets"]) == ["t2i", "edit", "interleaved"]
    # calibration: one P(A beats B) per pair (not per presentation order), chosen = the winner
    cal = res["metrics"]["calibration"]
    assert cal["n"] == 4 and res["rank"]["rank_mode"] == "thurstone"
    p = win_probability([r["score"][0] for r in res["records"]], [r["sigma"][0] for r in res["records"]],
                        [r["score"][1] for r in res["records"]], [r["sigma"][1] for r in res["records"]])
    want = calibration_metrics(p, torch.tensor([float(r["chosen"] == "A") for r in res["records"]]))
    for k, v in want.items():
        assert cal[k] == pytest.approx(v, abs=1e-9), k
    assert out.with_suffix(".reliability.png").exists()


def test_rank_mode_comes_from_the_checkpoint_unless_the_flag_says_otherwise(tmp_path, jrm_checkpoint):
    """A checkpoint that records loss.rank_mode=bt (as the trainer writes jrm_config.json) is calibrated
    with sigmoid(dmu); --rank-mode overrides; jrm-eval rescore keeps the recorded mode."""
    import shutil

    from jrm_dist.eval.common import rank_model

    ckpt = tmp_path / "bt_ckpt"
    shutil.copytree(jrm_checkpoint, ckpt)
    jcfg = json.loads((ckpt / "jrm_config.json").read_text())
    jcfg["loss"] = {"rank_mode": "bt", "ties": "model", "tie_margin": 0.5}
    (ckpt / "jrm_config.json").write_text(json.dumps(jcfg))
    assert rank_model(jrm_checkpoint) == {"rank_mode": "thurstone", "tie_margin": 0.0, "source": "default"}
    assert rank_model(ckpt) == {"rank_mode": "bt", "tie_margin": 0.5, "source": "checkpoint"}
    assert rank_model(ckpt, "bt_expected") == {"rank_mode": "bt_expected", "tie_margin": 0.5, "source": "flag"}

    _mmrb2_folder(tmp_path / "mmrb2")
    out = tmp_path / "bt.json"
    assert cli.main(["mmrb2", "--model", str(ckpt), "--data", str(tmp_path / "mmrb2"), "--out", str(out),
                     "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    recs = res["records"]
    # Rao–Kupper with margin 0.5, conditioned on a decided pair; sigma plays no part
    p = win_probability([r["score"][0] for r in recs], 123.0, [r["score"][1] for r in recs], 7.0, "bt", 0.5)
    want = calibration_metrics(p, torch.tensor([float(r["chosen"] == "A") for r in recs]))
    assert res["metrics"]["calibration"]["rank_mode"] == "bt"
    assert res["metrics"]["calibration"]["log_likelihood"] == pytest.approx(want["log_likelihood"], abs=1e-9)
    assert cli.main(["rescore", "--results", str(out), "--out", str(tmp_path / "re.json")]) == 0
    again = json.loads((tmp_path / "re.json").read_text())
    assert again["metrics"]["calibration"]["log_likelihood"] == pytest.approx(want["log_likelihood"], abs=1e-12)
    assert (tmp_path / "re.reliability.png").exists()
    assert cli.main(["rescore", "--results", str(out), "--out", str(tmp_path / "th.json"), "--rank-mode",
                     "thurstone"]) == 0
    th = json.loads((tmp_path / "th.json").read_text())
    assert th["rank"]["source"] == "flag" and th["metrics"]["calibration"]["rank_mode"] == "thurstone"
