"""A stand-in for the Ollama server, for tests only: for `ollama pull` from the registry, which
needs the network this machine does not have. Everything else runs against the real Ollama
(tests/real_ollama.py, ../shared/tools/ollama).

`python tests/ollama_server.py PORT`: the parts of Ollama's HTTP API that the `ollama` CLI
(tests/ollama) uses, following the documented contract: `HEAD /` (heartbeat),
`GET /api/version`, `GET /api/tags`, `POST /api/pull` (NDJSON progress, an in-stream or plain
error), `DELETE /api/delete` (404 for an unknown model). Like the real server, it alone
decides where the store is: its own $OLLAMA_MODELS when it started. What can be pulled is
the JSON file named by $OLLAMA_STANDIN_REGISTRY: {"name:tag": {"model_type": "7B", "file_type":
"Q4_K_M", "gguf_file": optional path of a real GGUF to use as the weights, "revision": n}}; a
changed revision makes a re-pull bring new weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import ollama_store  # noqa: E402

STORE = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def display(name: str) -> str:
    host, namespace, model, tag = ollama_store.parse_name(name)
    if host == ollama_store.DEFAULT_HOST:
        return f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


def registry() -> dict[str, Any]:
    path = os.environ.get("OLLAMA_STANDIN_REGISTRY")
    return json.loads(Path(path).read_text()) if path else {}


def prune() -> None:
    """Delete blobs no manifest references, as Ollama does after a pull or delete."""
    keep = ollama_store.referenced_digests(STORE)
    for blob in (STORE / "blobs").glob("sha256-*"):
        if blob.name.replace("sha256-", "sha256:", 1) not in keep:
            blob.unlink()


def pull(name: str) -> list[dict[str, Any]]:
    """The progress lines of a pull (the last one `success`, or an error)."""
    lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
    spec = registry().get(display(name))
    if spec is None:
        return [{"error": "pull model manifest: file does not exist"}]
    if spec.get("gguf_file"):
        weights = Path(spec["gguf_file"]).read_bytes()
    else:
        weights = ollama_store.gguf_bytes(
            arch=spec.get("arch", "llama"), size_label=spec.get("model_type", "1B"),
            file_type=spec.get("file_type", "Q4_K_M"),
            name=f"{display(name)} r{spec.get('revision', 1)}")
    digest = hashlib.sha256(weights).hexdigest()
    lines.append({"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}",
                  "total": len(weights), "completed": len(weights)})
    (STORE / "manifests").mkdir(parents=True, exist_ok=True)
    ollama_store.add_model(STORE, display(name), model_type=spec.get("model_type", "1B"),
                           file_type=spec.get("file_type", "Q4_K_M"),
                           arch=spec.get("arch", "llama"), gguf_bytes=weights)
    prune()
    lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
              {"status": "removing unused layers"}, {"status": "success"}]
    return lines


def tags() -> list[dict[str, Any]]:
    found = []
    for manifest in sorted((STORE / "manifests").glob("*/*/*/*")):
        host, namespace, model, tag = manifest.parts[-4:]
        name = display(f"{host}/{namespace}/{model}:{tag}")
        found.append({"name": name, "model": name,
                      "digest": hashlib.sha256(manifest.read_bytes()).hexdigest()})
    return found


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *_args: Any) -> None:
        pass

    def _json(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = (body if isinstance(body, bytes) else json.dumps(body).encode())
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def do_HEAD(self) -> None:  # noqa: N802 - the heartbeat
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/api/version":
            self._json(200, {"version": "0.0.0-standin"})
        elif self.path == "/api/tags":
            self._json(200, {"models": tags()})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/api/pull":
            self._json(404, {"error": "not found"})
            return
        body = self._body()
        lines = pull(body.get("model") or body.get("name") or "")
        if "error" in lines[0]:  # nothing sent yet: a plain error
            self._json(500, lines[0])
            return
        self._json(200, b"".join(json.dumps(line).encode() + b"\n" for line in lines),
                   "application/x-ndjson")

    def do_DELETE(self) -> None:  # noqa: N802
        if self.path != "/api/delete":
            self._json(404, {"error": "not found"})
            return
        body = self._body()
        name = body.get("model") or body.get("name") or ""
        if not ollama_store.manifest_path(STORE, display(name)).exists():
            self._json(404, {"error": f"model '{name}' not found"})
            return
        ollama_store.remove_model(STORE, display(name))
        self._json(200, {})


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
