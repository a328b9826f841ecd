"""Identical inputs get identical scores at every batch size (issue: identical EditReward-Bench
outputs were counted correct in ~18% of rows at the default batch size, because a batched forward is
not batch-invariant at the ~1e-8 level). Content keys make each distinct input one forward row."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jrm_dist.eval import mmrb2, tiger
from jrm_dist.eval.common import Scorer
from jrm_dist.eval.editscore import EditScoreBench

from bench_releases import write_editscore_release

BATCHES = (1, 3, 8)
SIZES = [(56, 42), (112, 84), (28, 28), (84, 56)]  # different prompt lengths: batches pad differently


def picture(colour, size, speck=0) -> Image.Image:
    im = Image.new("RGB", size, (225, 225, 225))
    im.paste(colour, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    for i in range(speck):
        im.putpixel((i % size[0], (7 * i) % size[1]), (20, 20, 20))
    return im


def png(im: Image.Image, level: int = 6) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=level)
    return buf.getvalue()


@pytest.fixture(scope="module")
def scorers(jrm_checkpoint):
    base = Scorer(jrm_checkpoint, batch_size=1, device="cpu")
    out = {}
    for b in BATCHES:  # one model, three batch sizes
        s = object.__new__(Scorer)
        s.__dict__.update(base.__dict__)
        s.batch_size = b
        out[b] = s
    return out


def editscore_folder(path, rows):
    write_editscore_release(path, [(r[0], r[1], r[2], r[3], r[4] if len(r) > 4 else "subject-add", "overall")
                                   for r in rows])
    return EditScoreBench(path)


def identical_rows(n=12):
    """Row 0 repeats one key (one item) so later pairs straddle batch boundaries; then rows whose two
    outputs have the same pixels under different keys (one of them PNG-encoded differently)."""
    rows = [(["solo", "solo"], "make the square red", png(picture((9, 9, 9), SIZES[0])),
             [png(picture((200, 0, 0), SIZES[0]))] * 2)]
    for i in range(n):
        size = SIZES[i % len(SIZES)]
        out = picture((20 * i, 200 - 10 * i, 40), size, speck=i)
        rows.append(([f"a{i}", f"b{i}"], f"make the square colour {i}", png(picture((128, 128, 128), size)),
                     [png(out), png(out, level=1 + i % 8)]))
    return rows


@pytest.mark.parametrize("batch", BATCHES)
def test_editscore_identical_outputs_are_never_correct(tmp_path, scorers, batch):
    bench = editscore_folder(tmp_path / "bench", identical_rows())
    res = bench.evaluate(scorers[batch].score_items(bench.items()))
    same = [r for r in res.records if r["key"][0] != "solo"]
    assert all(r["score"][0] == r["score"][1] for r in same), [r["score"][0] - r["score"][1] for r in same]
    assert sum(r["correct"] for r in same) == 0
    assert res.metrics["counts"]["overall"]["subject-add"][0] == 0  # 'solo' (one key) is a tie too


@pytest.mark.parametrize("batch", BATCHES)
def test_editscore_swapped_duplicates_give_exactly_half(tmp_path, scorers, batch):
    solo = png(picture((9, 9, 9), SIZES[0]))  # one item (one key): later pairs straddle batch boundaries
    rows = [(["solo", "solo"], "make it so", solo, [solo, solo], "extract")]
    for i in range(8):
        size = SIZES[i % len(SIZES)]
        src = png(picture((128, 128, 128), size))
        x, y = picture((30 * i, 60, 200), size, speck=i), picture((30 * i, 61, 200), size, speck=i + 1)
        rows.append(([f"x{i}", f"y{i}"], f"edit {i}", src, [png(x), png(y)]))
        rows.append(([f"y{i}'", f"x{i}'"], f"edit {i}", src, [png(y, 1), png(x, 1)]))  # same pixels, new keys
    bench = editscore_folder(tmp_path / "bench", rows)
    res = bench.evaluate(scorers[batch].score_items(bench.items()))
    assert res.metrics["accuracy"]["overall"]["subject-add"] == 0.5
    for a, b in zip(res.records[1::2], res.records[2::2]):
        assert a["score"] == b["score"][::-1]  # bit-equal, swapped


def test_one_item_scores_within_1e6_at_batch_sizes_1_3_8(tmp_path, scorers):
    bench = editscore_folder(tmp_path / "bench", identical_rows(6))
    got = {b: scorers[b].score_items(bench.items()) for b in BATCHES}
    for key in ("a3", "b5", "solo"):
        mus = [got[b][key].mu for b in BATCHES]
        assert max(mus) - min(mus) <= 1e-6, mus
        print(f"[ties] {key}: mu at batch 1/3/8 = {mus}, spread {max(mus) - min(mus):.3g}")


IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.mark.parametrize("batch", BATCHES)
def test_tiger_and_mmrb2_identical_candidates_are_never_correct(tmp_path, scorers, batch):
    # TIGER 3pair (ties dropped, m == 0 is wrong): candidates with equal pixels, different PNG bytes
    root = tmp_path / "tiger"
    (root / "3pair").mkdir(parents=True)
    rows = []
    for i in range(8):  # row 0: the same bytes twice (one item), so later pairs straddle batch boundaries
        size = SIZES[i % len(SIZES)]
        c = picture((10, 20 * i, 90), size, speck=i)
        rows.append({"id": f"{i}_AvsB", "instruction": f"make it {i}", "source_image": {"bytes": png(
            picture((128, 128, 128), size)), "path": None}, "candidate_1": {"bytes": png(c), "path": None},
            "candidate_2": {"bytes": png(c, 1 if i else 6), "path": None}, "ranking": "A>B",
            "comparison_type": "AvsB"})
    pq.write_table(pa.table({k: pa.array([r[k] for r in rows], IMAGE if "image" in k or "candidate" in k else None)
                             for k in rows[0]}), root / "3pair" / "train-00000-of-00001.parquet")
    tb = tiger.TigerBench(root)
    res = tb.evaluate(scorers[batch].score_items(tb.items()))
    assert all(r["m"] == 0.0 for r in res.records)
    assert res.metrics["subsets"]["3pair"]["pairwise_accuracy"] == 0.0

    # MMRB2 (strict '>' judge in both orders): identical responses under different encodings
    lst = pa.list_(IMAGE)
    (tmp_path / "mm" / "t2i").mkdir(parents=True)
    n = 8
    resp = [picture((200, 10 * i, 10), SIZES[i % len(SIZES)], speck=i) for i in range(n)]
    t = pa.table({  # row 0: the same bytes twice (one item), so later pairs straddle batch boundaries
        "pair_id": [f"p{i}" for i in range(n)], "prompt_text": [f"a square {i}" for i in range(n)],
        "prompt_images": pa.array([[] for _ in range(n)], lst),
        "response_a_images": pa.array([[{"bytes": png(r), "path": None}] for r in resp], lst),
        "response_b_images": pa.array([[{"bytes": png(r, 1 if i else 6), "path": None}] for i, r in enumerate(resp)],
                                      lst),
        "response_a_text": [""] * n, "response_b_text": [""] * n, "chosen": ["A"] * n})
    pq.write_table(t, tmp_path / "mm" / "t2i" / "test-00000-of-00001.parquet")
    mb = mmrb2.MMRB2Bench(tmp_path / "mm")
    res = mb.evaluate(scorers[batch].score_items(mb.items()))
    assert all(r["score"][0] == r["score"][1] for r in res.records)
    assert res.metrics["overall"]["accuracy"] == 0.0
