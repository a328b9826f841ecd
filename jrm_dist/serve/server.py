"""``jrm-serve``: a reward server for online RL (Flow-GRPO / GRPO style) on a JRM checkpoint.

POST /v1/reward with JSON ``{"items": [{"instruction", "source_images": [b64...], "image": b64}]}`` →
``{"rewards": [{"mu", "sigma"}]}``. POST /v1/compare with ``{"pairs": [{"instruction", "source_images",
"a": {"image"}, "b": {"image"}}]}`` → per pair both rewards and ``p_a_beats_b``, the model's P(A beats B)
under the rank mode the checkpoint was trained with (see docs/calibration.md).

Requests are decoded and encoded (images → patches, prompt →
tokens) in the request's own thread, then queued; one worker drains the queue into batches of up to
``max_batch`` candidates, waiting at most ``max_wait_ms`` for more, so concurrent RL workers share
forward passes; each distinct input is scored once (content key), so equal items get equal rewards.
Only JSON is parsed (never pickle); body size, image pixels and items per request are capped with 413/422
answers, and all bodies in flight together by ``--max-inflight-mb`` (503 + Retry-After beyond it);
binds to loopback unless told otherwise. FastAPI serves the OpenAPI spec
at /openapi.json and docs at /docs.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, Field

log = logging.getLogger("jrm_dist.serve")


# ----------------------------------------------------------------------------- wire format
class RewardItem(BaseModel):
    instruction: str = Field(..., description="the edit instruction / prompt", max_length=20000)
    source_images: list[str] = Field(default_factory=list, description="base64 PNG/JPEG/WebP source image(s)")
    image: str = Field(..., description="base64 image to score (the edited / generated image)")
    text: str | None = Field(None, description="optional candidate text shown with the image", max_length=20000)


class RewardRequest(BaseModel):
    items: list[RewardItem] = Field(..., min_length=1, description="batch of things to score (non-empty)")


class Reward(BaseModel):
    mu: float = Field(..., description="reward mean")
    sigma: float = Field(..., description="reward standard deviation (the model's uncertainty)")


class RewardResponse(BaseModel):
    rewards: list[Reward]
    model: str
    latency_ms: float


class PairCandidate(BaseModel):
    image: str = Field(..., description="base64 image of this candidate")
    text: str | None = Field(None, description="optional candidate text shown with the image", max_length=20000)


class PairItem(BaseModel):
    instruction: str = Field(..., description="the instruction / prompt both candidates answer", max_length=20000)
    source_images: list[str] = Field(default_factory=list, description="base64 source image(s) shared by a and b")
    a: PairCandidate
    b: PairCandidate


class CompareRequest(BaseModel):
    pairs: list[PairItem] = Field(..., min_length=1, description="pairs to compare (non-empty)")


class Comparison(BaseModel):
    a: Reward
    b: Reward
    p_a_beats_b: float = Field(..., description="P(A beats B) from both Gaussian rewards under the rank mode")


class CompareResponse(BaseModel):
    comparisons: list[Comparison]
    rank_mode: str = Field(..., description="thurstone | bt_expected | bt: how p_a_beats_b was computed")
    tie_margin: float = Field(..., description="> 0: P(A beats B | not a tie) under the trained tie model")
    model: str
    latency_ms: float


@dataclass
class Limits:
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_items: int = 64
    max_images_per_item: int = 8
    # memory all request bodies in flight may take together (each charged BODY_MEMORY_FACTOR x its size)
    max_inflight_bytes: int = 1024 * 1024 * 1024

    def check(self) -> None:
        need = BODY_MEMORY_FACTOR * self.max_body_bytes
        if self.max_inflight_bytes < need:
            raise ValueError(f"max_inflight_bytes={self.max_inflight_bytes} < {BODY_MEMORY_FACTOR} x max_body_bytes "
                             f"({self.max_body_bytes}) = {need}: a largest request could never be admitted (raise "
                             "--max-inflight-mb or lower --max-body-mb)")


# While a request is decoded its raw body, the JSON text and the parsed strings, the base64 text as bytes
# and the decoded image bytes are alive at once: one 60 MB request grew the server's RSS by 286 MB (4.8x).
# Each body is charged 5x its size against the in-flight budget, so RSS growth stays under the budget.
BODY_MEMORY_FACTOR = 5


# ----------------------------------------------------------------------------- request body caps
class BodyLimit:
    """ASGI middleware: buffer the body up to ``max_bytes`` and answer 413 beyond it (Content-Length or
    streamed), before any parsing happens. All requests together may hold at most ``max_inflight_bytes``
    (each charged ``BODY_MEMORY_FACTOR`` x its body, from its first byte until its response is sent);
    beyond that the answer is 503 with Retry-After, so concurrent large bodies cannot exhaust memory."""

    def __init__(self, app, max_bytes: int, max_inflight_bytes: int | None = None, retry_after_s: int = 1):
        self.app = app
        self.max_bytes = max_bytes
        self.max_inflight = max_inflight_bytes if max_inflight_bytes is not None else 1 << 62
        self.retry_after_s = retry_after_s
        self.inflight = 0  # charged bytes of the requests being read or processed (one event loop: no lock)
        self.peak_inflight = 0
        self.busy_rejections = 0

    def _take(self, n: int) -> bool:
        if n > 0 and self.inflight + n > self.max_inflight:
            return False
        self.inflight += n
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        return True

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        declared = int(declared) if declared is not None and declared.isdigit() else None
        if declared is not None and declared > self.max_bytes:
            return await self._reject(send)
        held = 0
        try:
            want = BODY_MEMORY_FACTOR * (declared or 0)
            if not self._take(want):
                return await self._busy(send)
            held = want
            chunks, size, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body = msg.get("body", b"")
                size += len(body)
                if size > self.max_bytes:
                    return await self._reject(send)
                if BODY_MEMORY_FACTOR * size > held:  # streamed (no Content-Length) or longer than declared
                    if not self._take(BODY_MEMORY_FACTOR * size - held):
                        return await self._busy(send)
                    held = BODY_MEMORY_FACTOR * size
                chunks.append(body)
                more = msg.get("more_body", False)
            whole = [b"".join(chunks)]
            chunks.clear()  # the pieces go now, not when the request ends
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": whole.pop(), "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.inflight -= held

    async def _reject(self, send):
        body = b'{"detail":"request body larger than max_body_bytes=%d"}' % self.max_bytes
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def _busy(self, send):
        self.busy_rejections += 1
        body = b'{"detail":"server busy: request bodies in flight would exceed max_inflight_bytes=%d; retry"}' % \
            self.max_inflight
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(self.retry_after_s).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- decoding
def decode_image(data: str, limits: Limits, where: str) -> Image.Image:
    """base64 → RGB image; the pixel cap is checked from the header, before decoding the pixels."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{where}: not valid base64") from None
    try:
        im = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"{where}: {e}") from None
    except Exception as e:  # PIL raises several types for non-images
        raise HTTPException(422, f"{where}: not a decodable image ({type(e).__name__})") from None
    w, h = im.size
    if w * h > limits.max_image_pixels:
        raise HTTPException(413, f"{where}: {w}x{h} = {w * h} pixels > max_image_pixels={limits.max_image_pixels}")
    try:
        im.load()
        return im.convert("RGB")
    except Exception as e:
        raise HTTPException(422, f"{where}: cannot decode image ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- dynamic batching
@dataclass
class _Job:
    encoded: list
    keys: list[str]  # content keys (eval.common.encoded_key): equal inputs are scored once per forward
    future: asyncio.Future


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    items: int = 0
    max_requests_in_batch: int = 0
    started: float = field(default_factory=time.time)


class DynamicBatcher:
    """asyncio queue + one worker: groups concurrent requests into forwards of <= max_batch candidates.
    Each distinct input (by content key) is scored once and its score handed to every item holding it
    (within a request, across batched requests, and later repeats while it is among the ``cache_size``
    most recent), so identical items get bit-equal rewards whatever the batch composition."""

    def __init__(self, scorer, max_batch: int, max_wait_ms: float, cache_size: int = 4096):
        self.scorer = scorer
        self.cache_size = cache_size  # recent scores by content key: a repeat gets the same bits later too
        self._recent: collections.OrderedDict = collections.OrderedDict()  # touched by the forward thread only
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.stats = BatchStats()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jrm-forward")  # one forward at a time
        self._held: _Job | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    async def submit(self, encoded: list) -> list:
        from jrm_dist.eval.common import encoded_key

        loop = asyncio.get_running_loop()
        keys = await loop.run_in_executor(None, lambda: [encoded_key(e) for e in encoded])  # off the event loop
        fut = loop.create_future()
        await self.queue.put(_Job(encoded, keys, fut))
        return await fut

    def _forward(self, keys: list[str], encoded: list) -> list:
        """Score the distinct inputs not in the recent-score cache, one forward row each."""
        todo = {k: e for k, e in zip(keys, encoded) if k not in self._recent}
        items = list(todo.items())
        for i in range(0, len(items), self.max_batch):  # a single big request is split
            chunk = items[i: i + self.max_batch]
            for (k, _), s in zip(chunk, self.scorer.score_encoded([e for _, e in chunk])):
                self._recent[k] = s
        out = []
        for k in keys:
            self._recent.move_to_end(k)
            out.append(self._recent[k])
        while len(self._recent) > max(self.cache_size, len(set(keys))):
            self._recent.popitem(last=False)
        return out

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = self._held or await self.queue.get()
            self._held = None
            jobs, n = [first], len(set(first.keys))  # a batch slot per distinct input
            deadline = loop.time() + self.max_wait
            while n < self.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
                if n + len(set(job.keys)) > self.max_batch:
                    self._held = job  # first in the next batch
                    break
                jobs.append(job)
                n += len(set(job.keys))
            jobs = [j for j in jobs if not j.future.cancelled()]  # the client went away
            if not jobs:
                continue
            try:
                scores = await loop.run_in_executor(self._pool, self._forward, [k for j in jobs for k in j.keys],
                                                    [e for j in jobs for e in j.encoded])
            except Exception as e:  # noqa: BLE001 - a failed forward fails its requests, not the server
                log.exception("forward failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.stats.batches += 1
            self.stats.requests += len(jobs)
            self.stats.items += n
            self.stats.max_requests_in_batch = max(self.stats.max_requests_in_batch, len(jobs))
            k = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(scores[k: k + len(j.encoded)])
                k += len(j.encoded)


# ----------------------------------------------------------------------------- app
def create_app(model_dir: str, max_batch: int = 16, max_wait_ms: float = 10.0, limits: Limits | None = None,
               device: str = "auto", dtype: str = "float32", max_pixels: int | None = None, scorer=None,
               rank_mode: str | None = None) -> FastAPI:
    """Build the app with the model loaded (``scorer`` lets a caller share an already-loaded one).
    ``rank_mode`` overrides the checkpoint's recorded loss for /v1/compare."""
    from contextlib import asynccontextmanager

    from jrm_dist.eval.common import Scorer, rank_model

    limits = limits or Limits()
    limits.check()
    rank = rank_model(model_dir, rank_mode)
    scorer = scorer or Scorer(model_dir, batch_size=max_batch, device=device, dtype=dtype, max_pixels=max_pixels)
    batcher = DynamicBatcher(scorer, max_batch, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="jrm-serve", version="1", lifespan=lifespan,
                  description="Reward server of a Joint Reward Model: (source image(s), instruction, edited image) "
                              "→ Gaussian reward (mu, sigma).")
    app.state.batcher = batcher
    app.state.limits = limits

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        # FastAPI's default handler echoes the offending input and fails (500) on a non-UTF-8 body:
        # answer with location, message and type only.
        detail = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": detail})

    def encode(req: RewardRequest) -> list:
        if len(req.items) > limits.max_items:
            raise HTTPException(413, f"items: {len(req.items)} > max_items={limits.max_items}")
        encoded = []
        for i, it in enumerate(req.items):
            if len(it.source_images) + 1 > limits.max_images_per_item:
                raise HTTPException(413, f"items[{i}]: {len(it.source_images) + 1} images > "
                                         f"max_images_per_item={limits.max_images_per_item}")
            src = [decode_image(s, limits, f"items[{i}].source_images[{j}]") for j, s in enumerate(it.source_images)]
            encoded.append(encode_candidate(it.instruction, src, it.image, it.text, f"items[{i}]", ".image"))
        return encoded

    def encode_candidate(instruction: str, src: list, image_b64: str, text: str | None, where: str, field: str):
        """Decode one candidate image and encode it with its (already decoded) source images."""
        cand = decode_image(image_b64, limits, where + field)
        try:
            return scorer.encode(instruction, src, [cand], text)
        except ValueError as e:  # e.g. a prompt longer than the model's max_length
            raise HTTPException(422, f"{where}: {e}") from None

    @app.post("/v1/reward", response_model=RewardResponse, summary="Score a batch of edits",
              responses={413: {"description": "body, image or batch too large"},
                         422: {"description": "malformed JSON, wrong types, empty batch, bad image"},
                         503: {"description": "busy: bodies in flight over max_inflight_bytes; retry after Retry-After"}})
    async def reward(req: RewardRequest) -> RewardResponse:
        t0 = time.perf_counter()
        encoded = await run_in_threadpool(encode, req)
        scores = await batcher.submit(encoded)
        return RewardResponse(rewards=[Reward(mu=s.mu, sigma=s.sigma) for s in scores], model=str(model_dir),
                              latency_ms=1000 * (time.perf_counter() - t0))

    def encode_pairs(req: CompareRequest) -> list:
        """Two candidates per pair (a then b), the pair's source images decoded once for both."""
        if 2 * len(req.pairs) > limits.max_items:
            raise HTTPException(413, f"pairs: {len(req.pairs)} pairs = {2 * len(req.pairs)} candidates > "
                                     f"max_items={limits.max_items}")
        encoded = []
        for i, pr in enumerate(req.pairs):
            if len(pr.source_images) + 1 > limits.max_images_per_item:
                raise HTTPException(413, f"pairs[{i}]: {len(pr.source_images) + 1} images per candidate > "
                                         f"max_images_per_item={limits.max_images_per_item}")
            src = [decode_image(s, limits, f"pairs[{i}].source_images[{j}]") for j, s in enumerate(pr.source_images)]
            for side in ("a", "b"):
                cand = getattr(pr, side)
                encoded.append(encode_candidate(pr.instruction, src, cand.image, cand.text, f"pairs[{i}].{side}", ".image"))
        return encoded

    @app.post("/v1/compare", response_model=CompareResponse, summary="P(A beats B) for pairs of candidates",
              responses={413: {"description": "body, image or batch too large"},
                         422: {"description": "malformed JSON, wrong types, empty batch, bad image"}})
    async def compare(req: CompareRequest) -> CompareResponse:
        from jrm_dist.metrics import win_probability

        t0 = time.perf_counter()
        encoded = await run_in_threadpool(encode_pairs, req)
        scores = await batcher.submit(encoded)
        a, b = scores[0::2], scores[1::2]
        p = win_probability([s.mu for s in a], [s.sigma for s in a], [s.mu for s in b], [s.sigma for s in b],
                            mode=rank["rank_mode"], tie_margin=rank["tie_margin"]).tolist()
        return CompareResponse(
            comparisons=[Comparison(a=Reward(mu=x.mu, sigma=x.sigma), b=Reward(mu=y.mu, sigma=y.sigma), p_a_beats_b=q)
                         for x, y, q in zip(a, b, p)],
            rank_mode=rank["rank_mode"], tie_margin=rank["tie_margin"], model=str(model_dir),
            latency_ms=1000 * (time.perf_counter() - t0))

    @app.get("/health", summary="Liveness and batching statistics")
    async def health() -> dict:
        s = batcher.stats
        return {"status": "ok", "model": str(model_dir), "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                "batches": s.batches, "requests": s.requests, "items": s.items,
                "max_requests_in_batch": s.max_requests_in_batch, "queue": batcher.queue.qsize(),
                "uptime_s": time.time() - s.started, "rank_mode": rank["rank_mode"]}

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, max_inflight_bytes=limits.max_inflight_bytes)
    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(prog="jrm-serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="JRM checkpoint folder (jrm-export output)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default; 0.0.0.0 exposes it)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=16, help="candidates per forward pass")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    ap.add_argument("--max-body-mb", type=float, default=64.0, help="cap on one request body (413 beyond)")
    ap.add_argument("--max-inflight-mb", type=float, default=1024.0,
                    help=f"memory all request bodies in flight may take together, each charged {BODY_MEMORY_FACTOR}x "
                         "its size (503 + Retry-After beyond); must be >= that times --max-body-mb")
    ap.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    ap.add_argument("--max-items", type=int, default=64, help="items per request")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-pixels", type=int, default=None, help="cap on pixels fed to the model (resize)")
    ap.add_argument("--rank-mode", default=None, choices=("thurstone", "bt_expected", "bt"),
                    help="how /v1/compare computes P(A beats B) (default: the checkpoint's loss.rank_mode, else "
                         "thurstone)")
    ap.add_argument("--log-level", default="info")
    a = ap.parse_args(argv)
    limits = Limits(max_body_bytes=int(a.max_body_mb * 1024 * 1024), max_image_pixels=a.max_image_pixels,
                    max_items=a.max_items, max_inflight_bytes=int(a.max_inflight_mb * 1024 * 1024))
    try:
        limits.check()
    except ValueError as e:
        ap.error(str(e))
    app = create_app(a.model, a.max_batch, a.max_wait_ms, limits, a.device, a.dtype, a.max_pixels,
                     rank_mode=a.rank_mode)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)


if __name__ == "__main__":
    main()
