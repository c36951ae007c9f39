"""Ollama's API in the shapes the engines speak, and back: pure functions, no I/O.

A request to `/api/chat` becomes one to `/v1/chat/completions`; `/api/generate` one to
`/v1/chat/completions` (the model's template applied), or to llama-server's own `/completion`
(`raw`, `context`) or `/infill` (`suffix`); `/api/embed` one to `/v1/embeddings`. Replies come
back as Ollama's: newline-delimited JSON when streamed, with the counts and durations
(nanoseconds) llama-server's timings give. runtime/ollama_routes.py sends them through the
front.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

# The Ollama release whose API this follows, checked with its own CLI and Python library.
# Clients parse it as numbers (Open WebUI, the CLI's version check): no suffix.
OLLAMA_VERSION = "0.32.15"
# A model that never expires: Ollama's own answer (now + the longest Go duration, ~292
# years), which its CLI shows as "Forever".
FOREVER = 2**63 / 1e9

# Ollama option -> the field llama-server reads, on both its OpenAI and its own endpoints.
SAMPLER_OPTIONS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "typical_p": "typical_p", "seed": "seed", "stop": "stop",
    "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "mirostat": "mirostat", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta",
    "num_keep": "n_keep",
}
# Options that shape a model when it loads: a loaded model cannot change them. custom_models.yaml
# sets them per model (ctx_size, sampler_args); requests carrying them are served as loaded.
LOAD_OPTIONS = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_thread",
    "low_vram", "f16_kv", "vocab_only", "numa", "logits_all", "embedding_only",
    "rope_frequency_base", "rope_frequency_scale", "penalize_newline", "tfs_z",
})
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                 "h": 3600.0}
CUT_SHORT = ("the model server ended the answer early (it stopped or crashed; see "
             "'model logs')")
_DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "eos": "stop",
                 "word": "stop", "limit": "length"}


class OllamaError(ValueError):
    """A request Ollama's API would refuse: answered as {"error": message} with `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def error_body(message: str) -> dict[str, str]:
    return {"error": message}


def now_iso(at: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if at is None else at, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def peer_tag(name: str) -> dict[str, Any]:
    """`/api/tags`'s entry for a peer's model (PEERS): its name; the file is the peer's."""
    details = {"parent_model": "", "format": "gguf", "family": "", "families": [],
               "parameter_size": "", "quantization_level": ""}
    return {"name": name, "model": name, "modified_at": now_iso(0), "size": 0, "digest": "",
            "details": details}


def strip_latest(name: str) -> str:
    """Ollama's `X:latest` is `X`."""
    return name[:-len(":latest")] if name.lower().endswith(":latest") else name


# --- keep_alive -----------------------------------------------------------------------------
def parse_keep_alive(value: Any) -> float | None:
    """Seconds a model stays loaded after this request (Ollama's `keep_alive`): None when not
    given, 0 to unload now, -1 for never. A number is seconds; a string is a Go duration
    ("5m", "1h30m", "-1s") or a number."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise OllamaError("keep_alive must be a duration (\"5m\") or a number of seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise OllamaError(f"keep_alive {value!r} is not a duration: use e.g. \"5m\", "
                                  "\"1h\", \"30s\", 0 (unload now) or -1 (never)") from None
            seconds = sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise OllamaError("keep_alive must be a duration (\"5m\") or a number of seconds")
    if math.isnan(seconds):
        raise OllamaError("keep_alive must be a duration (\"5m\") or a number of seconds")
    # Past Ollama's own "forever" (the longest Go duration) is forever: a date that far off
    # cannot be written, and the unloader compares it as a number.
    return -1.0 if seconds < 0 or seconds >= FOREVER else seconds


# --- requests -------------------------------------------------------------------------------
@dataclass
class Translated:
    """What to send the engine for one Ollama request."""

    path: str  # /v1/chat/completions, /completion, /infill, /v1/embeddings
    body: dict[str, Any]
    stream: bool
    ignored: list[str] = field(default_factory=list)  # load-time options not applied
    # /completion: the prompt's text, to be tokenized and put after `context` (the reply's
    # context is then the whole conversation's tokens, as Ollama's is)
    text: str | None = None
    context: list[int] = field(default_factory=list)

    def with_tokens(self, tokens: list[int]) -> Translated:
        self.body["prompt"] = [*self.context, *tokens]
        return self

    def encoded(self) -> bytes:
        return json.dumps(self.body, ensure_ascii=False).encode()


def _options(options: Any, native: bool) -> tuple[dict[str, Any], list[str]]:
    if options is None:
        return {}, []
    if not isinstance(options, dict):
        raise OllamaError("options must be an object, e.g. {\"temperature\": 0.2}")
    out: dict[str, Any] = {}
    ignored = []
    for key, value in options.items():
        if key == "num_predict":
            if isinstance(value, int) and value >= 0:  # -1 endless, -2 fill the context
                out["n_predict" if native else "max_tokens"] = value
        elif key in SAMPLER_OPTIONS:
            out[SAMPLER_OPTIONS[key]] = value
        elif key in LOAD_OPTIONS:
            ignored.append(key)
    return out, sorted(ignored)


def _format(fmt: Any, native: bool) -> dict[str, Any]:
    if fmt in (None, ""):
        return {}
    if fmt == "json":
        schema: dict[str, Any] = {"type": "object"}
    elif isinstance(fmt, dict):
        schema = fmt
    else:
        raise OllamaError("format must be \"json\" or a JSON schema (an object)")
    if native:
        return {"json_schema": schema}
    if fmt == "json":
        return {"response_format": {"type": "json_object"}}
    return {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "format", "schema": schema}}}


def _think(think: Any) -> dict[str, Any]:
    if think is None:
        return {}
    if isinstance(think, bool):
        return {"chat_template_kwargs": {"enable_thinking": think}}
    if think in ("low", "medium", "high", "max"):
        return {"chat_template_kwargs": {"enable_thinking": True},
                "reasoning_effort": "high" if think == "max" else think}
    raise OllamaError("think must be true, false, \"low\", \"medium\" or \"high\"")


def image_url(image: Any) -> dict[str, Any]:
    """One of Ollama's base64 images as an OpenAI image part (its type read from its bytes)."""
    if not isinstance(image, str):
        raise OllamaError("images must be base64 strings")
    try:
        head = base64.b64decode(image[:24] + "=" * (-len(image[:24]) % 4), validate=False)
    except (binascii.Error, ValueError):
        raise OllamaError("an image is not valid base64") from None
    kind = ("image/png" if head.startswith(b"\x89PNG") else
            "image/gif" if head.startswith(b"GIF8") else
            "image/webp" if head[8:12] == b"WEBP" else "image/jpeg")
    return {"type": "image_url", "image_url": {"url": f"data:{kind};base64,{image}"}}


def _content(text: Any, images: Any) -> Any:
    text = "" if text is None else text
    if not isinstance(text, str):
        raise OllamaError("message content must be a string")
    if not images:
        return text
    if not isinstance(images, list):
        raise OllamaError("images must be a list of base64 strings")
    return [*([{"type": "text", "text": text}] if text else []),
            *(image_url(i) for i in images)]


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value or {}, ensure_ascii=False)


def openai_messages(messages: Any) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's: images as image parts, tool calls with their arguments
    as JSON text and an id each, tool results tied to the call they answer."""
    if not isinstance(messages, list):
        raise OllamaError("messages must be a list")
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (call id, function name), oldest first
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise OllamaError(f"messages[{index}] must be an object with a role")
        role = message["role"]
        item: dict[str, Any] = {"role": role,
                                "content": _content(message.get("content"),
                                                    message.get("images"))}
        if role == "assistant" and message.get("thinking"):
            item["reasoning_content"] = message["thinking"]
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            item["tool_calls"] = []
            for number, call in enumerate(calls):
                function = call.get("function", {}) if isinstance(call, dict) else {}
                call_id = call.get("id") or f"call_{index}_{number}"
                name = function.get("name", "")
                item["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": name, "arguments": _arguments(function.get("arguments"))}})
                unanswered.append((call_id, name))
        if role == "tool":
            name = message.get("tool_name") or message.get("name")
            match = next((u for u in unanswered if name and u[1] == name), None) or \
                (unanswered[0] if unanswered else None)
            if message.get("tool_call_id"):
                item["tool_call_id"] = message["tool_call_id"]
            elif match is not None:
                item["tool_call_id"] = match[0]
            if match is not None:
                unanswered.remove(match)
        out.append(item)
    return out


def chat_request(data: dict[str, Any], model: str) -> Translated:
    """POST /api/chat -> /v1/chat/completions for `model` (the name the engine routes)."""
    stream = data.get("stream", True) is not False
    options, ignored = _options(data.get("options"), native=False)
    body: dict[str, Any] = {"model": model, "messages": openai_messages(data.get("messages")),
                            "stream": stream, **options, **_format(data.get("format"), False),
                            **_think(data.get("think"))}
    if data.get("tools"):
        body["tools"] = data["tools"]
    if stream:
        body["stream_options"] = {"include_usage": True}
    return Translated("/v1/chat/completions", body, stream, ignored)


def generate_request(data: dict[str, Any], model: str) -> Translated:
    """POST /api/generate: the prompt in the model's template (with `system`) through the
    chat endpoint; `raw` or `context` through llama-server's /completion (the prompt as it
    is, after the context's tokens); `suffix` through /infill (fill in the middle)."""
    stream = data.get("stream", True) is not False
    prompt = data.get("prompt") or ""
    if not isinstance(prompt, str):
        raise OllamaError("prompt must be a string")
    context = data.get("context") or []
    if not isinstance(context, list) or not all(isinstance(t, int) for t in context):
        raise OllamaError("context must be a list of token ids (from an earlier reply)")
    suffix = data.get("suffix")
    raw = bool(data.get("raw"))
    if suffix or raw or context:
        if data.get("images"):
            raise OllamaError("images need the model's template: send them without raw, "
                              "suffix and context (or use /api/chat)")
        options, ignored = _options(data.get("options"), native=True)
        body: dict[str, Any] = {"model": model, "stream": stream, "return_tokens": True,
                                **options, **_format(data.get("format"), True)}
        system = data.get("system")
        text = f"{system}\n\n{prompt}" if system and not raw else prompt
        if suffix:
            return Translated("/infill", {**body, "input_prefix": text,
                                          "input_suffix": suffix, "prompt": ""},
                              stream, ignored)
        body["prompt"] = [*context, text] if context else text
        return Translated("/completion", body, stream, ignored, text, context)
    messages: list[dict[str, Any]] = []
    if data.get("system"):
        messages.append({"role": "system", "content": data["system"]})
    messages.append({"role": "user", "content": prompt, "images": data.get("images")})
    chat = {**data, "messages": messages}
    return chat_request(chat, model)


def embed_request(data: dict[str, Any], model: str, legacy: bool) -> Translated:
    """POST /api/embed ({"input": text or list}) or the older /api/embeddings ({"prompt"})."""
    text = data.get("prompt") if legacy else data.get("input")
    if text is None:
        text = ""
    if not isinstance(text, (str, list)):
        raise OllamaError("input must be a string or a list of strings")
    body: dict[str, Any] = {"model": model, "input": text, "encoding_format": "float"}
    if isinstance(data.get("dimensions"), int) and data["dimensions"] > 0:
        body["dimensions"] = data["dimensions"]
    _options_, ignored = _options(data.get("options"), native=False)
    return Translated("/v1/embeddings", body, False, ignored)


# --- replies --------------------------------------------------------------------------------
def metrics(timings: dict[str, Any] | None, usage: dict[str, Any] | None,
            total_ns: int) -> dict[str, int]:
    """Ollama's counts and durations (ns) from llama-server's timings (usage as a fallback).
    load_duration is the time the request spent outside prompt and generation: waiting for
    room and loading the model."""
    timings, usage = timings or {}, usage or {}
    prompt_n = int(timings.get("prompt_n", usage.get("prompt_tokens", 0)) or 0)
    eval_n = int(timings.get("predicted_n", usage.get("completion_tokens", 0)) or 0)
    prompt_ns = int(float(timings.get("prompt_ms", 0) or 0) * 1e6)
    eval_ns = int(float(timings.get("predicted_ms", 0) or 0) * 1e6)
    return {"total_duration": total_ns,
            "load_duration": max(0, total_ns - prompt_ns - eval_ns),
            "prompt_eval_count": prompt_n, "prompt_eval_duration": prompt_ns,
            "eval_count": eval_n, "eval_duration": eval_ns}


def ollama_tool_calls(calls: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's tool calls (arguments as JSON text) as Ollama's (arguments as an object)."""
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = {"arguments": arguments}  # what the model wrote, kept
        item: dict[str, Any] = {"function": {"index": index, "name": function.get("name", ""),
                                             "arguments": arguments}}
        if call.get("id"):
            item["id"] = call["id"]
        out.append(item)
    return out


def done_reason(reason: Any) -> str:
    return _DONE_REASONS.get(str(reason), "stop")


@dataclass
class Reply:
    """Builds Ollama's reply lines for one request: `chat` ({"message"}) or generate
    ({"response"})."""

    model: str  # the name the client sent
    chat: bool
    started: float = field(default_factory=time.monotonic)
    context: list[int] = field(default_factory=list)

    def line(self, content: str = "", thinking: str = "",
             tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": now_iso()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            out["message"] = message
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
            if tool_calls:
                out["tool_calls"] = tool_calls
        out["done"] = False
        return out

    def final(self, reason: str, timings: dict[str, Any] | None = None,
              usage: dict[str, Any] | None = None, content: str = "", thinking: str = "",
              tool_calls: list[dict[str, Any]] | None = None,
              tokens: list[int] | None = None) -> dict[str, Any]:
        out = self.line(content, thinking, tool_calls)
        out["done"] = True
        out["done_reason"] = reason
        if reason not in ("load", "unload"):
            total = int((time.monotonic() - self.started) * 1e9)
            out.update(metrics(timings, usage, total))
            if tokens is not None and not self.chat:
                out["context"] = [*self.context, *tokens]
        return out

    # Whole answers (stream: false) --------------------------------------------------------
    def from_openai(self, data: dict[str, Any]) -> dict[str, Any]:
        choice = (data.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        calls = ollama_tool_calls(message.get("tool_calls") or [])
        return self.final(done_reason(choice.get("finish_reason")), data.get("timings"),
                          data.get("usage"), message.get("content") or "",
                          message.get("reasoning_content") or "", calls or None)

    def from_native(self, data: dict[str, Any]) -> dict[str, Any]:
        tokens = data.get("tokens")
        return self.final(done_reason(data.get("stop_type") or "stop"), data.get("timings"),
                          None, data.get("content") or "",
                          tokens=tokens if isinstance(tokens, list) else [])

    def embed(self, data: dict[str, Any], legacy: bool) -> dict[str, Any]:
        vectors = [item.get("embedding", []) for item in data.get("data") or []]
        if legacy:
            return {"embedding": vectors[0] if vectors else []}
        usage = data.get("usage") or {}
        total = int((time.monotonic() - self.started) * 1e9)
        return {"model": self.model, "embeddings": vectors, "total_duration": total,
                "load_duration": 0, "prompt_eval_count": int(usage.get("prompt_tokens", 0))}


class StreamTranslator:
    """llama-server's server-sent events in, Ollama's newline-delimited JSON lines out."""

    def __init__(self, reply: Reply, native: bool) -> None:
        self.reply = reply
        self.native = native
        self.pending = b""
        self.calls: dict[int, dict[str, Any]] = {}
        self.reason = "stop"
        self.timings: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self.tokens: list[int] = []
        self.finished = False
        self.ended = False  # the engine said the answer is over (a finish reason, a stop)

    def feed(self, chunk: bytes) -> list[bytes]:
        self.pending += chunk
        lines = []
        while b"\n" in self.pending:
            line, self.pending = self.pending.split(b"\n", 1)
            lines += self._event(line.strip())
        return lines

    def finish(self) -> list[bytes]:
        lines = self._event(self.pending.strip()) if self.pending else []
        self.pending = b""
        if not self.finished and not self.ended:
            # The stream stopped without its end (the model server was killed or crashed):
            # Ollama's error line, not a "done" that would pass a cut answer for a whole one.
            self.finished = True
            lines.append(_encode(error_body(CUT_SHORT)))
        elif not self.finished:
            lines += self._done()
        return lines

    def _event(self, line: bytes) -> list[bytes]:
        if not line.startswith(b"data:") and not line.startswith(b"error:"):
            return []
        payload = line.split(b":", 1)[1].strip()
        if payload == b"[DONE]":
            self.ended = True
        if payload == b"[DONE]" or self.finished:
            return []
        try:
            data = json.loads(payload)
        except ValueError:
            return []
        if not isinstance(data, dict):
            return []
        if "error" in data or line.startswith(b"error:"):
            error = data.get("error", data)
            message = error.get("message") if isinstance(error, dict) else str(error)
            self.finished = True
            return [_encode(error_body(str(message)))]
        if data.get("timings"):
            self.timings = data["timings"]
        if data.get("usage"):
            self.usage = data["usage"]
        return self._native(data) if self.native else self._openai(data)

    def _openai(self, data: dict[str, Any]) -> list[bytes]:
        out = []
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            for call in delta.get("tool_calls") or []:
                slot = self.calls.setdefault(int(call.get("index", len(self.calls))),
                                             {"function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    slot["id"] = call["id"]
                function = call.get("function") or {}
                slot["function"]["name"] += function.get("name") or ""
                slot["function"]["arguments"] += function.get("arguments") or ""
            content = delta.get("content") or ""
            thinking = delta.get("reasoning_content") or ""
            if content or thinking:
                out.append(_encode(self.reply.line(content, thinking)))
            if choice.get("finish_reason"):
                self.reason = done_reason(choice["finish_reason"])
                self.ended = True
        return out

    def _native(self, data: dict[str, Any]) -> list[bytes]:
        tokens = data.get("tokens")
        if isinstance(tokens, list):
            self.tokens += [t for t in tokens if isinstance(t, int)]
        out = []
        if data.get("content"):
            out.append(_encode(self.reply.line(data["content"])))
        if data.get("stop"):
            self.reason = done_reason(data.get("stop_type") or "stop")
            out += self._done()
        return out

    def _done(self) -> list[bytes]:
        self.finished = True
        out = []
        if self.calls:
            calls = ollama_tool_calls(self.calls[i] for i in sorted(self.calls))
            out.append(_encode(self.reply.line(tool_calls=calls)))
        out.append(_encode(self.reply.final(self.reason, self.timings, self.usage,
                                            tokens=self.tokens if self.native else None)))
        return out


def _encode(line: dict[str, Any]) -> bytes:
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


def error_message(body: bytes) -> str:
    """The message of an engine's or the front's error answer, whatever its shape."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or "the engine answered an error"
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


# --- model descriptions ---------------------------------------------------------------------
_BLOB = re.compile(r"sha256-([0-9a-f]{64})")


def digest(real_path: str, size: int, mtime: float) -> str:
    """A model's stable id without reading its bytes: the Ollama blob's own digest when the
    file is one, else a hash of its path, size and modification time."""
    match = _BLOB.fullmatch(real_path.rsplit("/", 1)[-1])
    if match:
        return match.group(1)
    return hashlib.sha256(f"{real_path}\0{size}\0{mtime}".encode()).hexdigest()


@dataclass
class ModelFacts:
    """What the Ollama API says about one served model (from the catalog and the plan)."""

    name: str
    size: int
    digest: str
    modified: float
    architecture: str
    size_label: str
    quantization: str
    context_length: int  # trained
    serving_context: int  # what it is loaded with
    embedding_length: int
    block_count: int
    path: str
    vision: bool = False
    tools: bool = False  # served with a Jinja chat template
    parameters: dict[str, Any] = field(default_factory=dict)
    generates: bool = True  # an embedding model or a reranker does not (models/kinds.py)
    embeddings: bool = False  # answers /api/embed

    def details(self) -> dict[str, Any]:
        family = self.architecture or "unknown"
        return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                "parameter_size": self.size_label, "quantization_level": self.quantization}

    def capabilities(self) -> list[str]:
        caps = ["completion"] if self.generates else []
        if self.embeddings:
            caps.append("embedding")  # as Ollama says of a model with a pooling type
        if self.tools and self.generates:
            caps.append("tools")
        if self.vision:
            caps.append("vision")
        return caps

    def tag(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.name, "modified_at": now_iso(self.modified),
                "size": self.size, "digest": self.digest, "details": self.details()}

    def running(self, expires_at: str, size: int, on_gpu: bool) -> dict[str, Any]:
        return {"name": self.name, "model": self.name, "size": size, "digest": self.digest,
                "details": self.details(), "expires_at": expires_at,
                "size_vram": size if on_gpu else 0, "context_length": self.serving_context}

    def show(self) -> dict[str, Any]:
        arch = self.architecture or "unknown"
        info: dict[str, Any] = {"general.architecture": arch, "general.file_type":
                                self.quantization, f"{arch}.context_length":
                                self.context_length, f"{arch}.block_count": self.block_count}
        if self.embedding_length:
            info[f"{arch}.embedding_length"] = self.embedding_length
        # num_ctx: the context the model is served with (clients such as Continue size their
        # prompts by it; model_info has the trained one).
        values = {**self.parameters, "num_ctx": self.serving_context}
        params = "\n".join(f"{key:<16}{json.dumps(value) if isinstance(value, str) else value}"
                           for key, value in sorted(values.items()))
        return {"license": "", "modelfile": f"# served by model_serve\nFROM {self.path}\n",
                "parameters": params, "template": "{{ .Prompt }}", "details": self.details(),
                "model_info": info, "capabilities": self.capabilities(),
                "modified_at": now_iso(self.modified)}


def expires_at(last_used: float, in_flight: int, keep_seconds: float, now: float) -> str:
    """When a loaded model goes if nothing uses it (`keep_seconds` <= 0: never)."""
    if keep_seconds <= 0:
        return now_iso(now + FOREVER)
    return now_iso((now if in_flight else last_used) + keep_seconds)
