"""Reading JSONL input as text without losing anything silently.

Lines are decoded as UTF-8 with ``surrogateescape``: a byte that is not UTF-8 survives as a lone
surrogate (U+DC80..U+DCFF) instead of becoming U+FFFD, so ``parse_line`` can reject the record with
reason ``bad_encoding`` and name the field that holds it (replacing it would train on corrupted text).
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

from jrm_dist.data.schema import SchemaError

_ESCAPED = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # after json.loads: only JSON escapes can put one here


def read_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for every physical line; undecodable bytes kept as surrogates."""
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first record
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="\n") as f:
        yield from enumerate(f, 1)


def _bad_field(obj: Any, path: str = "", pattern: re.Pattern = _ESCAPED) -> str | None:
    """Path (``candidates[1].rationale``) of the first string (or object key) that ``pattern`` finds
    (default: a non-UTF-8 byte)."""
    if isinstance(obj, str):
        return path if pattern.search(obj) else None
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _bad_field(v, f"{path}[{i}]", pattern)
            if found is not None:
                return found
    elif isinstance(obj, dict):
        for k, v in obj.items():
            here = f"{path}.{k}" if path else k
            if pattern.search(k):
                return here
            found = _bad_field(v, here, pattern)
            if found is not None:
                return found
    return None


def _printable(field: str) -> str:
    return field.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def parse_line(line: str) -> Any:
    """``json.loads`` that raises ``SchemaError('bad_encoding')`` (naming the field) for non-UTF-8 bytes
    and ``SchemaError('bad_json')`` for anything else that does not parse."""
    m = _ESCAPED.search(line)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        if m is not None:
            raise SchemaError("bad_encoding", f"byte 0x{ord(m.group()) - 0xDC00:02x} at character {m.start()} "
                                              f"is not valid UTF-8 (outside any field)") from None
        raise SchemaError("bad_json", f"line is not valid JSON: {exc}") from None
    if m is not None:
        field = _bad_field(obj)
        where = f"field '{_printable(field)}'" if field else "the line"
        raise SchemaError("bad_encoding", f"{where} holds byte 0x{ord(m.group()) - 0xDC00:02x}, which is not "
                                          f"valid UTF-8 (the record is rejected, not repaired)")
    field = _bad_field(obj, pattern=_SURROGATE)
    if field is not None:  # a JSON escape such as \\ud800 with no partner: no UTF-8 form exists
        name = field.encode("utf-8", "backslashreplace").decode()
        raise SchemaError("bad_encoding", f"field '{name}' holds an unpaired UTF-16 surrogate escape (\\ud800-"
                                          f"\\udfff), which is not a Unicode character (the record is rejected, "
                                          f"not repaired)")
    return obj
