"""Decoding a request body: bounded in nesting before the parser sees it, so no body can exhaust the
parser's recursion (a 500) however it is built; every failure is an InvalidRequest naming the problem."""

from __future__ import annotations

import json

from fluxserve.app.errors import InvalidRequest

# The contract's bodies nest two levels (an object holding a list); this leaves room for clients'
# habits while staying far below the parser's recursion limit.
MAX_JSON_DEPTH = 32

_OPEN, _CLOSE, _QUOTE, _BACKSLASH = frozenset(b"[{"), frozenset(b"]}"), ord('"'), ord("\\")


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in `body`, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif byte in _CLOSE:
            depth -= 1
    return deepest


def decode_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> object:
    # Counting brackets is C-speed; the byte-by-byte scan runs only for a body that could nest that deep.
    if body.count(b"[") + body.count(b"{") > max_depth and json_depth(body) > max_depth:
        raise InvalidRequest(f"Request body nests too deeply (at most {max_depth} levels of arrays and objects)")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("Request body must be valid JSON") from None
