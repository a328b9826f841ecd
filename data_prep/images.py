"""Image checks for data_prep: every image is fully decoded once at prep time (so a truncated or
corrupt file becomes a reject with its reason, not a crash at step 40,000), and re-encoded only
when ``--max-pixels`` asks for it (otherwise the original bytes are stored untouched)."""
from __future__ import annotations

import io
import math
import os
import re
import warnings

from PIL import Image, UnidentifiedImageError

from jrm_dist.data.schema import SchemaError

# PIL format name -> file extension used in the shard (must be one of schema.IMAGE_EXTS).
FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp"}


def check_image(data: bytes | None, field: str, max_pixels: int | None = None) -> tuple[bytes, str]:
    """Decode ``data`` fully; return (bytes to store, extension).

    Raises SchemaError('missing_image' | 'undecodable_image' | 'unsupported_image_format').
    """
    if data is None or len(data) == 0:
        raise SchemaError("missing_image", f"{field}: no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.load()
                w, h = im.size
                if max_pixels and w * h > max_pixels:
                    return _reencode(im, fmt, max_pixels), ("jpg" if fmt == "JPEG" else "png")
    except SchemaError:
        raise
    except UnidentifiedImageError:
        raise SchemaError("undecodable_image", f"{field}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        # no object addresses in the message: rejects.jsonl must be the same on every run
        msg = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))
        raise SchemaError("undecodable_image", f"{field}: {type(exc).__name__}: {msg}") from None
    ext = FORMAT_EXT.get(fmt or "")
    if ext is None:
        raise SchemaError("unsupported_image_format",
                          f"{field}: format {fmt} is not one of {sorted(FORMAT_EXT)}; pass --max-pixels to re-encode")
    return data, ext


def _reencode(im: Image.Image, fmt: str | None, max_pixels: int) -> bytes:
    """Downscale to at most ``max_pixels`` keeping the aspect ratio; JPEG stays JPEG, the rest PNG."""
    w, h = im.size
    scale = math.sqrt(max_pixels / float(w * h))
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    mode = "RGB" if im.mode not in ("RGB", "RGBA", "L") or fmt == "JPEG" else im.mode
    small = im.convert(mode).resize((nw, nh), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "JPEG":
        small.save(buf, format="JPEG", quality=95)
    else:
        small.save(buf, format="PNG")
    return buf.getvalue()


def read_image_file(path: str | None, root: str | None, field: str, allow_outside: bool = False) -> bytes:
    """Read an image file named by ``path``, resolved under ``root`` (``--images``).

    A path that leads out of ``root`` (absolute, or with ``..``) is rejected (``image_outside_root``)
    unless ``allow_outside`` (``--allow-outside-images``): a record must not make jrm-prep read and
    publish arbitrary files of the machine it runs on. The check is on the normalised path, so
    symlinks placed inside ``root`` are followed as the user laid them out."""
    if not path:
        raise SchemaError("missing_image", f"{field}: no image path")
    full = path if root is None else os.path.normpath(os.path.join(os.path.abspath(root), path))
    if root is not None and not allow_outside:
        base = os.path.normpath(os.path.abspath(root))
        if os.path.commonpath([full, base]) != base:
            raise SchemaError("image_outside_root", f"{field}: {path!r} resolves to {full}, outside the image "
                                                    f"root {base} (--images); pass --allow-outside-images to read it")
    try:
        with open(full, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SchemaError("missing_image", f"{field}: cannot read {full}: {exc.strerror or exc}") from None
