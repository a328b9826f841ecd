"""jrm-serve under concurrent large bodies: the aggregate in-flight budget (``--max-inflight-mb``) answers
503 + Retry-After beyond it, and the server's RSS growth stays under the budget (a real subprocess,
peak RSS read from /proc: VmHWM after resetting it with clear_refs)."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from train_launch import ROOT

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")]

MB = 1024 * 1024


def status_mb(pid: int, field: str) -> float:
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith(field + ":"):
            return int(ln.split()[1]) / 1024
    raise KeyError(field)


@pytest.fixture
def serve(jrm_checkpoint):
    procs = []

    def start(*args: str) -> tuple[str, subprocess.Popen]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        p = subprocess.Popen([sys.executable, "-m", "jrm_dist.serve.server", "--model", jrm_checkpoint, "--port",
                              str(port), "--device", "cpu", "--log-level", "warning", *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if p.poll() is not None:
                raise AssertionError(f"jrm-serve exited {p.returncode}: {p.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url, p
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("jrm-serve did not start")

    yield start
    for p in procs:
        p.terminate()
        p.wait(30)


@pytest.mark.launch  # a jrm-serve process and concurrent clients
def test_concurrent_large_bodies_stay_under_the_inflight_budget(serve):
    budget_mb = 400  # admits one 60 MB body at a time (charged 5x = 300 MB)
    url, p = serve("--max-inflight-mb", str(budget_mb))
    # 45 MB of random bytes as base64 (60 MB JSON body): valid base64, not an image -> 422 once decoded
    body = json.dumps({"items": [{"instruction": "x", "image": base64.b64encode(os.urandom(45 * MB)).decode()}]})
    body = body.encode()
    assert 59 * MB < len(body) < 61 * MB
    base = status_mb(p.pid, "VmRSS")
    Path(f"/proc/{p.pid}/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    first: list[tuple[int, str | None]] = []
    final: list[int] = []

    def client():
        for attempt in range(60):  # a client that honours Retry-After
            r = httpx.post(f"{url}/v1/reward", content=body, headers={"content-type": "application/json"},
                           timeout=120)
            if attempt == 0:
                first.append((r.status_code, r.headers.get("retry-after")))
            if r.status_code != 503:
                final.append(r.status_code)
                return
            time.sleep(float(r.headers["retry-after"]))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    peak = status_mb(p.pid, "VmHWM")
    growth = peak - base
    print(f"[serve-memory] 8 concurrent 60 MB bodies, budget {budget_mb} MB: RSS {base:.0f} -> peak {peak:.0f} MB "
          f"(growth {growth:.0f} MB); first answers {sorted(first)}")
    assert final == [422] * 8  # every body was eventually read and answered (not an image)
    assert any(c == 503 and ra == "1" for c, ra in first)  # the budget answered busy, with Retry-After
    assert growth < budget_mb
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_budget_smaller_than_one_request_is_a_startup_error(jrm_checkpoint):
    p = subprocess.run([sys.executable, "-m", "jrm_dist.serve.server", "--model", jrm_checkpoint,
                        "--max-body-mb", "64", "--max-inflight-mb", "100"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "--max-inflight-mb" in p.stderr


def test_streamed_body_without_length_is_charged_as_it_arrives():
    """No Content-Length: the budget is taken chunk by chunk, and released when the request ends."""
    import asyncio

    from jrm_dist.serve.server import BODY_MEMORY_FACTOR, BodyLimit

    seen = []

    async def app(scope, receive, send):
        msg = await receive()
        seen.append(len(msg["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = BodyLimit(app, max_bytes=10_000, max_inflight_bytes=BODY_MEMORY_FACTOR * 2_500)

    async def run(chunks):
        sent = []
        msgs = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return msgs.pop(0)

        async def send(m):
            sent.append(m)
        await mw({"type": "http", "headers": []}, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"])

    status, headers = asyncio.run(run([b"x" * 1000, b"x" * 1000]))
    assert status == 200 and seen == [2000] and mw.inflight == 0
    status, headers = asyncio.run(run([b"x" * 2000, b"x" * 1000]))
    assert status == 503 and headers[b"retry-after"] == b"1" and mw.inflight == 0
    assert mw.peak_inflight == BODY_MEMORY_FACTOR * 2000
