"""jrm-serve on a real uvicorn server (loopback, free port, in a thread): scores equal offline scoring,
concurrent clients share batches, bad input gets 4xx and the server keeps serving; the client's
Flow-GRPO-style reward function."""
from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from jrm_dist.eval.common import Scorer
from jrm_dist.serve.client import RewardClient, b64_png
from jrm_dist.serve.server import Limits, create_app

MAX_PIXELS = 200 * 200


def pic(rgb, size=(56, 42)) -> Image.Image:
    im = Image.new("RGB", size, (225, 225, 225))
    im.paste(rgb, (10, 10, 40, 30))
    return im


@pytest.fixture(scope="module")
def scorer(jrm_checkpoint):
    return Scorer(jrm_checkpoint, batch_size=8, device="cpu")


@contextlib.contextmanager
def running(app):
    """uvicorn serving ``app`` on a free loopback port, in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    for _ in range(600):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        th.join(timeout=20)
        sock.close()


@pytest.fixture(scope="module")
def server(jrm_checkpoint, scorer):
    limits = Limits(max_body_bytes=1_000_000, max_image_pixels=MAX_PIXELS, max_items=8)
    with running(create_app(jrm_checkpoint, max_batch=8, max_wait_ms=20, limits=limits, scorer=scorer)) as url:
        yield url


def offline_mu(scorer, instruction, sources, image) -> float:
    return scorer.score_encoded([scorer.encode(instruction, sources, [image])])[0].mu


def item(instruction, sources, image) -> dict:
    return {"instruction": instruction, "source_images": [b64_png(s) for s in sources], "image": b64_png(image)}


COLOURS = [(220, 30, 30), (30, 170, 40), (30, 60, 220), (240, 220, 30), (140, 40, 170), (245, 140, 20),
           (20, 20, 20), (250, 250, 250)]


def test_health_and_openapi(server):
    h = httpx.get(f"{server}/health").json()
    assert h["status"] == "ok" and h["max_batch"] == 8
    spec = httpx.get(f"{server}/openapi.json").json()
    assert "/v1/reward" in spec["paths"] and "RewardRequest" in spec["components"]["schemas"]


def test_scores_equal_offline_score(server, scorer):
    src = pic((128, 128, 128))
    items = [("make the square red", [src], pic(COLOURS[0])), ("make the square blue", [src], pic(COLOURS[2])),
             ("make the square green", [], pic(COLOURS[1], (70, 70)))]  # no source image, other size
    with RewardClient(server) as c:
        got = c.score([item(*x) for x in items])
    for (ins, s, im), g in zip(items, got):
        assert g["mu"] == pytest.approx(offline_mu(scorer, ins, s, im), abs=1e-5)
        assert g["sigma"] > 0
    assert got[0]["mu"] != got[1]["mu"]


def test_concurrent_clients_are_batched_and_correct(jrm_checkpoint, scorer):
    """8 one-item requests at once; the batch window (long) closes as soon as max_batch=8 items are in,
    so all of them share one forward pass."""
    src = pic((128, 128, 128))
    jobs = [(f"make the square {i}", [src], pic(c)) for i, c in enumerate(COLOURS)]

    def one(url, job):
        with RewardClient(url) as c:
            return c.score([item(*job)])[0]["mu"]

    with running(create_app(jrm_checkpoint, max_batch=len(jobs), max_wait_ms=10_000, scorer=scorer)) as url:
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda j: one(url, j), jobs))
        health = httpx.get(f"{url}/health").json()
    for job, g in zip(jobs, got):
        assert g == pytest.approx(offline_mu(scorer, *job), abs=1e-5)
    assert health["requests"] == len(jobs) and health["items"] == len(jobs)
    assert health["batches"] == 1 and health["max_requests_in_batch"] == len(jobs)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_bad_input_gets_4xx_and_server_keeps_serving(server, scorer):
    ok = item("make the square red", [pic((128, 128, 128))], pic(COLOURS[0]))
    big = pic(COLOURS[1], (300, 300))  # 90,000 px > 40,000
    post = lambda **kw: httpx.post(f"{server}/v1/reward", timeout=30, **kw)  # noqa: E731
    cases = {
        "malformed json": (post(content=b'{"items": [', headers={"content-type": "application/json"}), 422),
        "wrong types": (post(json={"items": [{"instruction": 5, "image": ["x"]}]}), 422),
        "items not a list": (post(json={"items": "abc"}), 422),
        "no items": (post(json={}), 422),
        "empty batch": (post(json={"items": []}), 422),
        "bad base64": (post(json={"items": [dict(ok, image="***not base64***")]}), 422),
        "not an image": (post(json={"items": [dict(ok, image=_b64(b"hello world"))]}), 422),
        "truncated png": (post(json={"items": [dict(ok, image=_b64(base64.b64decode(ok["image"])[:60]))]}), 422),
        "huge image": (post(json={"items": [dict(ok, image=b64_png(big))]}), 413),
        "huge source": (post(json={"items": [dict(ok, source_images=[b64_png(big)])]}), 413),
        "too many items": (post(json={"items": [ok] * 9}), 413),
        "body too large": (post(json={"items": [dict(ok, instruction="x" * 1_100_000)]}), 413),
        "pickle body": (post(content=b"\x80\x04\x95\x05\x00\x00", headers={"content-type": "application/octet-stream"}),
                        422),
    }
    for name, (r, code) in cases.items():
        assert r.status_code == code, f"{name}: {r.status_code} {r.text[:200]}"
    assert "items.0.instruction" in cases["wrong types"][0].text or "instruction" in cases["wrong types"][0].text
    assert "max_image_pixels" in cases["huge image"][0].json()["detail"]
    assert "items[0].source_images[0]" in cases["huge source"][0].json()["detail"]
    r = post(json={"items": [ok]})  # still serving, and still right
    assert r.status_code == 200
    assert r.json()["rewards"][0]["mu"] == pytest.approx(
        offline_mu(scorer, "make the square red", [pic((128, 128, 128))], pic(COLOURS[0])), abs=1e-5)
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_client_reward_fn_flow_grpo_style(server, scorer):
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.random((3, 3, 42, 56), dtype=np.float32))  # NCHW in [0, 1], as pipelines return
    refs = [pic((128, 128, 128)), [pic((128, 128, 128)), pic((10, 10, 10))], None]
    prompts = ["make the square red", "make the square blue", "make the square green"]
    with RewardClient(server, chunk=2) as c:
        scores, info = c.reward_fn(batch, prompts, [{"i": i} for i in range(3)], refs)
    assert scores.shape == (3,) and info["sigma"].shape == (3,) and info["metadata"][2] == {"i": 2}
    for i in range(3):
        arr = (batch[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        srcs = [] if refs[i] is None else (refs[i] if isinstance(refs[i], list) else [refs[i]])
        assert scores[i] == pytest.approx(offline_mu(scorer, prompts[i], srcs, Image.fromarray(arr)), abs=1e-5)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        c.reward_fn(batch, prompts[:2])
    with RewardClient(server) as c, pytest.raises(httpx.HTTPStatusError, match="413"):
        c.reward_fn([pic((1, 2, 3), (300, 300))], ["x"])


def test_request_larger_than_max_batch_is_split_and_correct(jrm_checkpoint, scorer):
    src = pic((128, 128, 128))
    jobs = [(f"make the square {i}", [src], pic(c)) for i, c in enumerate(COLOURS[:5])]
    with running(create_app(jrm_checkpoint, max_batch=2, max_wait_ms=5, scorer=scorer)) as url:
        with RewardClient(url) as c:
            got = [r["mu"] for r in c.score([item(*j) for j in jobs])]
    assert got == pytest.approx([offline_mu(scorer, *j) for j in jobs], abs=1e-5)


# ------------------------------------------------------------------ P(A beats B) for pairs
def pair(instruction, sources, image_a, image_b) -> dict:
    return {"instruction": instruction, "source_images": [b64_png(s) for s in sources],
            "a": {"image": b64_png(image_a)}, "b": {"image": b64_png(image_b)}}


def test_compare_returns_both_rewards_and_p_a_beats_b(server, scorer):
    """The fixture checkpoint records no loss: thurstone, Phi(dmu / sqrt(s_a^2 + s_b^2)); swapping a and b
    gives 1 - p; the client helper returns the same numbers."""
    from jrm_dist.metrics import win_probability

    src = pic((128, 128, 128))
    jobs = [("make the square red", [src], pic(COLOURS[0]), pic(COLOURS[2])),
            ("make the square green", [], pic(COLOURS[1], (70, 70)), pic(COLOURS[3]))]
    r = httpx.post(f"{server}/v1/compare", json={"pairs": [pair(*j) for j in jobs]}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rank_mode"] == "thurstone" and body["tie_margin"] == 0.0
    for (ins, s, ia, ib), c in zip(jobs, body["comparisons"]):
        a = scorer.score_encoded([scorer.encode(ins, s, [ia])])[0]
        b = scorer.score_encoded([scorer.encode(ins, s, [ib])])[0]
        assert c["a"]["mu"] == pytest.approx(a.mu, abs=1e-5) and c["b"]["sigma"] == pytest.approx(b.sigma, abs=1e-5)
        want = float(win_probability(a.mu, a.sigma, b.mu, b.sigma, "thurstone"))
        assert c["p_a_beats_b"] == pytest.approx(want, abs=1e-5)
        assert (c["p_a_beats_b"] > 0.5) == (c["a"]["mu"] > c["b"]["mu"])
    with RewardClient(server, chunk=2) as cl:  # one pair per request
        p, info = cl.p_a_beats_b([j[3] for j in jobs], [j[2] for j in jobs], [j[0] for j in jobs],
                                 [src, None])
    assert p == pytest.approx([1 - c["p_a_beats_b"] for c in body["comparisons"]], abs=1e-6)
    assert info["mu_b"] == pytest.approx([c["a"]["mu"] for c in body["comparisons"]], abs=1e-6)
    with pytest.raises(ValueError, match="must be equal"):
        cl.p_a_beats_b([src], [src, src], ["x"])
    spec = httpx.get(f"{server}/openapi.json").json()
    assert "/v1/compare" in spec["paths"] and "CompareRequest" in spec["components"]["schemas"]


def test_compare_bad_input_gets_4xx(server):
    ok = pair("make the square red", [pic((128, 128, 128))], pic(COLOURS[0]), pic(COLOURS[2]))
    post = lambda body: httpx.post(f"{server}/v1/compare", json=body, timeout=30)  # noqa: E731
    assert post({"pairs": []}).status_code == 422
    assert post({"pairs": [{k: v for k, v in ok.items() if k != "b"}]}).status_code == 422
    r = post({"pairs": [ok] * 5})  # 10 candidates > max_items=8
    assert r.status_code == 413 and "max_items=8" in r.json()["detail"]
    r = post({"pairs": [dict(ok, b={"image": _b64(b"hello")})]})
    assert r.status_code == 422 and "pairs[0].b.image" in r.json()["detail"]
    r = post({"pairs": [dict(ok, a={"image": b64_png(pic(COLOURS[1], (300, 300)))})]})
    assert r.status_code == 413 and "pairs[0].a.image" in r.json()["detail"]
    assert post({"pairs": [ok]}).status_code == 200


def test_compare_uses_the_checkpoint_rank_mode(jrm_checkpoint, scorer, tmp_path):
    """A checkpoint trained with bt and a tie margin (recorded in jrm_config.json by the trainer):
    P(A beats B | decided) under Rao–Kupper, sigma unused; --rank-mode overrides."""
    import json
    import math
    import shutil

    from fastapi.testclient import TestClient

    ckpt = tmp_path / "bt"
    shutil.copytree(jrm_checkpoint, ckpt)
    jcfg = json.loads((ckpt / "jrm_config.json").read_text())
    jcfg["loss"] = {"rank_mode": "bt", "ties": "model", "tie_margin": 0.5}
    (ckpt / "jrm_config.json").write_text(json.dumps(jcfg))
    body = {"pairs": [pair("make the square red", [], pic(COLOURS[0]), pic(COLOURS[4]))]}
    with TestClient(create_app(str(ckpt), scorer=scorer)) as c:
        res = c.post("/v1/compare", json=body).json()
        assert c.get("/health").json()["rank_mode"] == "bt"
    z = res["comparisons"][0]["a"]["mu"] - res["comparisons"][0]["b"]["mu"]
    sg = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert res["rank_mode"] == "bt" and res["tie_margin"] == 0.5
    assert res["comparisons"][0]["p_a_beats_b"] == pytest.approx(sg(z - 0.5) / (sg(z - 0.5) + sg(-z - 0.5)), abs=1e-9)
    with TestClient(create_app(str(ckpt), scorer=scorer, rank_mode="thurstone")) as c:
        assert c.post("/v1/compare", json=body).json()["rank_mode"] == "thurstone"
