"""The benchmark arithmetic on hand-made scores with answers worked out by hand (ties, reversed orders,
missing cells), plus ``jrm-eval rescore`` recomputing a saved results file."""
from __future__ import annotations

import json
import math

import pytest

from jrm_dist.eval import cli, editscore, mmrb2, tiger
from jrm_dist.eval.common import BenchmarkFormatError


# ------------------------------------------------------------------ EditScore release
def test_editscore_ties_are_wrong_and_average_is_over_task_types():
    rows = [("subject-add", "overall"), ("subject-add", "overall"), ("subject-add", "overall"),
            ("subject-remove", "overall"), ("color_alter", "overall"), ("color_alter", "overall"),
            ("subject-add", "prompt_following")]
    s0 = [2.0, 1.0, 0.0, 3.0, 1.0, 0.0, 5.0]
    s1 = [1.0, 1.0, 1.0, 2.0, 0.0, 0.5, 4.0]
    m = editscore.editscore_metrics(rows, s0, s1)
    assert m["accuracy"]["overall"]["subject-add"] == pytest.approx(1 / 3)  # the tie (1.0, 1.0) is wrong
    assert m["counts"]["overall"]["subject-add"] == [1, 3]
    assert m["accuracy"]["overall"]["subject-remove"] == 1.0
    assert m["accuracy"]["overall"]["color_alter"] == 0.5
    assert m["accuracy"]["overall"]["extract"] is None
    assert m["groups"]["overall"]["object"] == pytest.approx((1 / 3 + 1) / 2)  # subject-replace absent
    assert m["groups"]["overall"]["appearance"] == 0.5
    assert m["groups"]["overall"]["scene"] is None
    # mean over task types (11/18), not over groups (7/12) nor over rows (3/6)
    assert m["average"]["overall"] == pytest.approx(11 / 18)
    assert m["average"]["prompt_following"] == 1.0
    assert m["average"]["consistency"] is None
    assert "extract/overall" in m["missing_cells"] and "subject-add/overall" not in m["missing_cells"]
    table = editscore.markdown_table(m)
    assert table.splitlines()[0] == "| Task | PF | Cons. | Overall |"
    assert "| **Average** | 100.00 | – | 61.11 |" in table
    assert "| subject-add | 100.00 | – | 33.33 |" in table


def test_editscore_all_13_task_types_and_groups():
    rows, s0, s1 = [], [], []
    for i, t in enumerate(editscore.TASK_TYPES):  # task i: i+1 rows, only the first right -> 1/(i+1)
        for j in range(i + 1):
            rows.append((t, "consistency"))
            s0.append(1.0 if j == 0 else 0.0)
            s1.append(0.0 if j == 0 else 0.0)  # the others are ties: wrong
    m = editscore.editscore_metrics(rows, s0, s1)
    acc = {t: 1 / (i + 1) for i, t in enumerate(editscore.TASK_TYPES)}
    assert m["accuracy"]["consistency"] == pytest.approx(acc)
    assert m["groups"]["consistency"]["object"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert m["groups"]["consistency"]["appearance"] == pytest.approx((1 / 4 + 1 / 5 + 1 / 6 + 1 / 7) / 4)
    assert m["groups"]["consistency"]["scene"] == pytest.approx((1 / 8 + 1 / 9) / 2)
    assert m["groups"]["consistency"]["advanced"] == pytest.approx((1 / 10 + 1 / 11 + 1 / 12 + 1 / 13) / 4)
    assert m["average"]["consistency"] == pytest.approx(sum(1 / k for k in range(1, 14)) / 13)
    assert not [c for c in m["missing_cells"] if c.endswith("/consistency")]


def test_editscore_rejects_unknown_task():
    with pytest.raises(ValueError, match="unknown task_type"):
        editscore.editscore_metrics([("subject_add", "overall")], [1.0], [0.0])


# ------------------------------------------------------------------ TIGER release
@pytest.mark.parametrize("ranking,ctype,h", [
    ("A>B", "AvsB", 1), ("B>A", "AvsB", -1), ("A=B", "AvsB", 0), ("A<B", "AvsB", -1), ("A=B=Good", None, 0),
    ("C>A", "AvsC", -1), ("A>C", "AvsC", 1), ("D>B", "BvsD", -1), ("B>D", "BvsD", 1), ("C=D", "CvsD", 0),
])
def test_tiger_human_label(ranking, ctype, h):
    assert tiger.human_label(ranking, ctype) == h


def test_tiger_human_label_errors_name_the_place():
    with pytest.raises(BenchmarkFormatError, match=r"f.parquet row 3 field 'ranking'.*comparison_type AvsB"):
        tiger.human_label("C>A", "AvsB", "f.parquet row 3")
    with pytest.raises(BenchmarkFormatError, match="field 'ranking'"):
        tiger.human_label("A?B", "AvsB", "x")
    with pytest.raises(BenchmarkFormatError, match="field 'comparison_type'"):
        tiger.human_label("A>B", "A-B", "x")


def test_accuracy_with_ties_eps_sweep():
    h = [1, 1, -1, 0, 0]
    m = [0.5, -0.2, -0.1, 0.05, 0.3]
    # by hand: eps 0 -> 2/5, 0.05 -> 3/5, 0.1 -> 2/5, 0.2 -> 2/5, 0.3 -> 3/5, 0.5 -> 2/5; first max wins
    acc, eps = tiger.accuracy_with_ties(h, m)
    assert acc == pytest.approx(3 / 5) and eps == pytest.approx(0.05)
    # an exact model tie with a human tie is right at eps = 0
    assert tiger.accuracy_with_ties([0, 1], [0.0, 1.0]) == (1.0, 0.0)


def test_accuracy_without_ties_drops_human_ties_and_model_tie_is_wrong():
    assert tiger.accuracy_without_ties([1, 1, -1, 0], [0.5, -0.2, 0.0, 0.3]) == pytest.approx(1 / 3)
    assert math.isnan(tiger.accuracy_without_ties([0, 0], [1.0, 2.0]))


def _tiger_records():
    rec = lambda sub, g, h, m: {"subset": sub, "group": g, "h": h, "m": m}  # noqa: E731
    return [rec("2pair", "g1", 1, 0.5), rec("2pair", "g2", 0, 0.05), rec("2pair", "g3", -1, 0.2),
            rec("2pair", "g4", 0, 0.4),
            rec("3pair", "x", 1, 0.3), rec("3pair", "x", 1, 0.1), rec("3pair", "x", -1, -0.2),
            rec("3pair", "y", 1, 0.3), rec("3pair", "y", -1, 0.0), rec("3pair", "y", 1, 0.2)]


def test_tiger_metrics_groups_and_overall():
    m = tiger.tiger_metrics(_tiger_records())
    two, three = m["subsets"]["2pair"], m["subsets"]["3pair"]
    # 2pair sweep by hand: eps 0 -> 1/4, 0.05 -> 2/4, 0.2 -> 2/4, 0.4 -> 3/4, 0.5 -> 2/4
    assert two["pairwise_accuracy"] == pytest.approx(3 / 4) and two["eps"] == pytest.approx(0.4)
    assert two["group_accuracy"] == pytest.approx(3 / 4) and two["groups"] == 4
    # 3pair: 5 of 6 pairs right (m == 0 is wrong); group y has the wrong pair
    assert three["pairwise_accuracy"] == pytest.approx(5 / 6) and three["pairwise_kind"] == "without_ties"
    assert three["group_accuracy"] == 0.5 and three["groups_correct"] == 1
    assert m["overall"]["group_accuracy"] == pytest.approx(4 / 6)
    assert m["overall"]["pairwise_accuracy_with_ties"] == pytest.approx(7 / 10)  # by hand, eps = 0.05
    assert "| **Overall** | 10 |" in tiger.markdown_table(m)


# ------------------------------------------------------------------ MMRB2
def test_mmrb2_scalar_judgements_both_orders():
    assert mmrb2.judgements(1.0, 0.0) == {"forward": "A", "reverse": "A"}
    assert mmrb2.judgements(0.0, 2.0) == {"forward": "B", "reverse": "B"}
    assert mmrb2.judgements(1.0, 1.0) == {"forward": None, "reverse": None}  # a tie is no judgement


def test_mmrb2_reverse_order_is_flipped_back():
    first = lambda a, b: "first"  # noqa: E731 - a judge that always picks the first-presented response
    j = mmrb2.judgements(0.0, 0.0, judge=first)
    assert j == {"forward": "A", "reverse": "B"}
    recs = [{"subset": "t2i", "chosen": "A", "forward": "A", "reverse": "A"},
            {"subset": "t2i", "chosen": "B", **j},
            {"subset": "edit", "chosen": "A", "forward": None, "reverse": None}]
    m = mmrb2.mmrb2_metrics(recs)
    assert m["subsets"]["t2i"]["accuracy"] == pytest.approx(3 / 4)
    assert m["subsets"]["t2i"]["forward_accuracy"] == 0.5 and m["subsets"]["t2i"]["reverse_accuracy"] == 1.0
    assert m["subsets"]["edit"]["accuracy"] == 0.0 and m["subsets"]["edit"]["judgements"] == 2
    assert m["overall"] == {"accuracy": 0.5, "judgements": 6, "correct": 3}
    assert list(m["subsets"]) == ["t2i", "edit"]  # the paper's order


def test_mmrb2_chosen_is_normalised_and_checked():
    assert mmrb2.normalise_chosen(" b ", "x") == "B"
    with pytest.raises(BenchmarkFormatError, match="row 7 field 'chosen'"):
        mmrb2.normalise_chosen("tie", "f.parquet row 7")


# ------------------------------------------------------------------ rescore from a results JSON
def test_rescore_cli_recomputes_from_saved_scores(tmp_path, capsys):
    records = [{"task_type": "subject-add", "dimension": "overall", "key": ["a", "b"], "score": [1.0, 0.0]},
               {"task_type": "subject-add", "dimension": "overall", "key": ["c", "d"], "score": [0.0, 0.0]}]
    res = editscore.rescore_records(records)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res.payload(model="m")))
    # edit one score: the tie becomes a win, so rescoring must change the figure
    data = json.loads(path.read_text())
    data["records"][1]["score"] = [0.5, 0.0]
    path.write_text(json.dumps(data))
    assert cli.main(["rescore", "--results", str(path), "--out", str(tmp_path / "r2.json")]) == 0
    out = json.loads((tmp_path / "r2.json").read_text())
    assert out["metrics"]["accuracy"]["overall"]["subject-add"] == 1.0
    assert res.metrics["accuracy"]["overall"]["subject-add"] == 0.5
    assert "| subject-add | – | – | 100.00 |" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmark": "nope", "records": []}))
    assert cli.main(["rescore", "--results", str(bad)]) == 2
