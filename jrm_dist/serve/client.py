"""Python client of ``jrm-serve``, with a Flow-GRPO-style reward function.

    from jrm_dist.serve.client import RewardClient
    reward_fn = RewardClient("http://127.0.0.1:8000").reward_fn
    scores, info = reward_fn(images, prompts, metadata, ref_images)   # scores: np.ndarray of mu
    p, info = RewardClient(url).p_a_beats_b(images_a, images_b, prompts, ref_images)  # P(A beats B)

Images may be PIL images, uint8 HWC arrays, float arrays/tensors in [0, 1] (HWC or CHW, or one
NCHW batch tensor as diffusion pipelines return), or encoded bytes; they travel as base64 PNG.
"""
from __future__ import annotations

import base64
import io
from typing import Any, Sequence

import numpy as np
from PIL import Image


def to_pil(x: Any) -> Image.Image:
    """PIL / bytes / numpy / torch (HWC or CHW, uint8 or float in [0, 1]) → RGB PIL image."""
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, (bytes, bytearray)):
        return Image.open(io.BytesIO(x)).convert("RGB")
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 3:
        raise ValueError(f"an image array must be 3-D (HWC or CHW), got shape {a.shape}")
    if a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.transpose(a, (1, 2, 0))
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return Image.fromarray(a[..., :3], "RGB")


def b64_png(x: Any) -> str:
    buf = io.BytesIO()
    to_pil(x).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _as_list(images: Any) -> list:
    if hasattr(images, "ndim") and getattr(images, "ndim") == 4:  # one NCHW / NHWC batch
        return [images[i] for i in range(images.shape[0])]
    return list(images)


class RewardClient:
    """Blocking client; ``chunk`` items per request (the server batches across requests anyway)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 120.0, chunk: int = 32):
        import httpx

        self.url = url.rstrip("/")
        self.chunk = chunk
        self._http = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def health(self) -> dict:
        r = self._http.get(f"{self.url}/health")
        r.raise_for_status()
        return r.json()

    def score(self, items: Sequence[dict]) -> list[dict]:
        """items: ``{"instruction", "source_images": [b64], "image": b64}`` → ``[{"mu", "sigma"}]``.
        A 4xx answer raises ``httpx.HTTPStatusError`` with the server's reason."""
        out: list[dict] = []
        for i in range(0, len(items), self.chunk):
            r = self._http.post(f"{self.url}/v1/reward", json={"items": list(items[i: i + self.chunk])})
            if r.status_code >= 400:
                import httpx

                raise httpx.HTTPStatusError(f"{r.status_code} from jrm-serve: {r.text}", request=r.request, response=r)
            out += r.json()["rewards"]
        return out

    def compare(self, pairs: Sequence[dict]) -> list[dict]:
        """pairs: ``{"instruction", "source_images": [b64], "a": {"image": b64}, "b": {"image": b64}}`` →
        ``[{"a": {"mu", "sigma"}, "b": {...}, "p_a_beats_b"}]`` (``chunk`` candidates per request)."""
        out: list[dict] = []
        step = max(1, self.chunk // 2)
        for i in range(0, len(pairs), step):
            r = self._http.post(f"{self.url}/v1/compare", json={"pairs": list(pairs[i: i + step])})
            if r.status_code >= 400:
                import httpx

                raise httpx.HTTPStatusError(f"{r.status_code} from jrm-serve: {r.text}", request=r.request, response=r)
            out += r.json()["comparisons"]
        return out

    def p_a_beats_b(self, images_a: Any, images_b: Any, prompts: Sequence[str], ref_images: Any = None,
                    ) -> tuple[np.ndarray, dict]:
        """P(image_a[i] beats image_b[i]) for prompt i (and source image(s) ``ref_images[i]``, or None), as
        the model's calibrated preference probability; info holds mu and sigma of both sides."""
        a, b = _as_list(images_a), _as_list(images_b)
        if not (len(a) == len(b) == len(prompts)):
            raise ValueError(f"{len(a)} images_a, {len(b)} images_b and {len(prompts)} prompts: must be equal")
        refs = _as_list(ref_images) if ref_images is not None else [None] * len(a)
        if len(refs) != len(a):
            raise ValueError(f"{len(a)} pairs but {len(refs)} ref_images")
        pairs = []
        for ia, ib, prompt, ref in zip(a, b, prompts, refs):
            srcs = [] if ref is None else (list(ref) if isinstance(ref, (list, tuple)) else [ref])
            pairs.append({"instruction": str(prompt), "source_images": [b64_png(s) for s in srcs],
                          "a": {"image": b64_png(ia)}, "b": {"image": b64_png(ib)}})
        res = self.compare(pairs)
        col = lambda side, k: np.array([r[side][k] for r in res], dtype=np.float64)  # noqa: E731
        info = {"mu_a": col("a", "mu"), "sigma_a": col("a", "sigma"), "mu_b": col("b", "mu"),
                "sigma_b": col("b", "sigma")}
        return np.array([r["p_a_beats_b"] for r in res], dtype=np.float64), info

    def reward_fn(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None,
                  ref_images: Any = None) -> tuple[np.ndarray, dict]:
        """Flow-GRPO-style reward: (scores = mu per image, info with sigma). ``ref_images[i]`` is the source
        image (or a list of source images) of sample i; None for text-to-image."""
        imgs = _as_list(images)
        if len(imgs) != len(prompts):
            raise ValueError(f"{len(imgs)} images but {len(prompts)} prompts")
        refs = _as_list(ref_images) if ref_images is not None else [None] * len(imgs)
        if len(refs) != len(imgs):
            raise ValueError(f"{len(imgs)} images but {len(refs)} ref_images")
        items = []
        for im, prompt, ref in zip(imgs, prompts, refs):
            srcs = [] if ref is None else (list(ref) if isinstance(ref, (list, tuple)) else [ref])
            items.append({"instruction": str(prompt), "source_images": [b64_png(s) for s in srcs], "image": b64_png(im)})
        rewards = self.score(items)
        mu = np.array([r["mu"] for r in rewards], dtype=np.float32)
        sigma = np.array([r["sigma"] for r in rewards], dtype=np.float32)
        return mu, {"sigma": sigma, "metadata": list(metadata) if metadata is not None else None}


def make_reward_fn(url: str = "http://127.0.0.1:8000", **kw):
    """A plain function for RL trainers that take ``reward_fn(images, prompts, metadata, ref_images)``."""
    return RewardClient(url, **kw).reward_fn
