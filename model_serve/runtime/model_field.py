"""The `model` a request names, wherever it names it, and the request with another name put
in its place: a JSON body, a form (`application/x-www-form-urlencoded`), a multipart body
(`/v1/audio/transcriptions`) or the query (`/props?model=`, the router's per-model GETs).
Every such request goes through the same names and admission as a JSON one."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

# name -> the engine's id for it (None: not a name we serve)
Rename = Callable[[str], str | None]


class BadBody(ValueError):
    """A body no model could read (the front answers 400 with the message)."""

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_MODEL_PART = re.compile(rb"content-disposition:[^\r\n]*[; ]name\*?=(?:utf-8'[^']*')?\"?model\"?"
                         rb"(?:[;\r\n]|$)", re.IGNORECASE)
_BLANK = b" \t\r\n"


def in_body(body: bytes, content_type: str,
            rename: Rename) -> tuple[bytes, str | None, str | None]:
    """(body with the engine's id, the name sent, the engine's id); the name is None when
    the body names no model, the id None when the name is not one we serve. A JSON body
    comes back without blanks or a byte-order mark before it."""
    kind = content_type.split(";", 1)[0].strip().lower()
    bare = body.lstrip(_BLANK).removeprefix(b"\xef\xbb\xbf").lstrip(_BLANK)
    if bare[:1] == b"{":
        return _json(bare, rename)  # the engines read it only without what went before
    if kind == "application/x-www-form-urlencoded":
        return _form(body, rename)
    if kind == "multipart/form-data":
        match = _BOUNDARY.search(content_type)
        if match:
            return _multipart(body, match.group(1).encode(), rename)
    return body, None, None


def in_query(pairs: list[tuple[str, str]],
             rename: Rename) -> tuple[str | None, str | None, str | None]:
    """(the query string with the engine's id, the name sent, the engine's id)."""
    sent = next((value for key, value in pairs if key == "model"), None)
    engine_id = rename(sent) if sent is not None else None
    if engine_id is None:
        return None, sent, None
    renamed = [(key, engine_id if key == "model" else value) for key, value in pairs]
    return urlencode(renamed), sent, engine_id


def _no_second_model(pairs: list[tuple[str, object]]) -> dict[str, object]:
    if sum(key == "model" for key, _value in pairs) > 1:
        # Engines disagree on which one counts (llama-swap takes the first, Python the last).
        raise BadBody("the JSON body names \"model\" more than once")
    return dict(pairs)


def _json(body: bytes, rename: Rename) -> tuple[bytes, str | None, str | None]:
    try:
        data = json.loads(body, object_pairs_hook=_no_second_model)
    except BadBody:
        raise
    except ValueError:
        return body, None, None
    sent = data.get("model") if isinstance(data, dict) else None
    if not isinstance(sent, str):
        return body, None, None
    engine_id = rename(sent)
    if engine_id is not None and engine_id != sent:
        data["model"] = engine_id
        try:
            body = json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError as exc:  # "\ud83d" alone: JSON allows it, text does not
            raise BadBody(f"the JSON body holds a lone surrogate ({exc.reason}): send whole "
                          "characters (UTF-8)") from None
    return body, sent, engine_id


def _form(body: bytes, rename: Rename) -> tuple[bytes, str | None, str | None]:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        return body, None, None
    query, sent, engine_id = in_query(pairs, rename)
    if query is None or engine_id == sent:
        return body, sent, engine_id
    return query.encode(), sent, engine_id


def _multipart(body: bytes, boundary: bytes,
               rename: Rename) -> tuple[bytes, str | None, str | None]:
    """Only the `model` part is touched; every other part (audio, images) stays byte for
    byte."""
    delimiter = b"--" + boundary
    parts = body.split(delimiter)
    for index, part in enumerate(parts):
        head, separator, value = part.partition(b"\r\n\r\n")
        if not separator or not _MODEL_PART.search(head):
            continue
        raw, ending = (value[:-2], value[-2:]) if value.endswith(b"\r\n") else (value, b"")
        try:
            sent = raw.decode("utf-8")
        except UnicodeDecodeError:
            return body, None, None
        engine_id = rename(sent)
        if engine_id is not None and engine_id != sent:
            parts[index] = head + separator + engine_id.encode() + ending
            return delimiter.join(parts), sent, engine_id
        return body, sent, engine_id
    return body, None, None
