"""Stage 4 of the data flow: one shard sample's bytes -> the validated group record and its image bytes.
Images over jrm-prep's pixel cap are refused from their header, before any pixel is decoded."""
from __future__ import annotations

import io
import json
import warnings

from PIL import Image

from jrm_dist.data.schema import validate_group


def decode_sample(raw: dict[str, bytes]) -> tuple[dict, dict[str, bytes]]:
    """json record + image bytes of one shard sample; raises ValueError naming the sample."""
    key = raw.get("__key__")
    if "json" not in raw:
        raise ValueError(f"sample {key!r} has no json record")
    try:
        rec = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"sample {key!r}: json record does not parse: {exc}") from None
    images = {k: v for k, v in raw.items() if not k.startswith("__") and k != "json"}
    validate_group(rec, set(images))
    cap = image_pixel_cap()
    for name in list(rec.get("source_images") or []) + [n for c in rec["candidates"] for n in c.get("images") or []]:
        w, h = image_size(images[name], f"sample {key!r} field {name!r}")
        if w * h > cap:
            raise ValueError(f"sample {key!r} field {name!r}: {w}x{h} = {w * h / 1e6:.1f} Mpx is over jrm-prep's "
                             f"decoded-pixel cap of {cap / 1e6:.1f} Mpx (PIL.Image.MAX_IMAGE_PIXELS); not decoded")
    return rec, images


def image_pixel_cap() -> int:
    """jrm-prep's decoded-pixel cap: data_prep.images.check_image turns Pillow's DecompressionBombWarning
    into a reject, i.e. refuses more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels. The loader refuses the
    same images (a hand-made or foreign shard can hold one) before decoding them."""
    return int(Image.MAX_IMAGE_PIXELS)


def image_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) from the image header only (Pillow opens lazily; no pixel is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller applies the cap
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad headers
        raise ValueError(f"{what}: cannot read the image header ({type(exc).__name__}: {exc})") from None
