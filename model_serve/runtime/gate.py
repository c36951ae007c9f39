"""Who may ask the front what: the port answers to its owner.

Checked on every request, before anything reaches the engine:
- `Host` (DNS rebinding: a web page whose name resolves to 127.0.0.1 sends its own name):
  localhost, IP addresses and LISTEN_HOST pass, and the names in ALLOWED_HOSTS;
- browsers from another site: a request that carries an `Origin` other than the page's own
  (or, without one, `Sec-Fetch-Site: cross-site`) is refused unless CORS_ORIGINS lists it,
  but for a link to the dashboard's page (a top-level navigation); logs and the SECRET
  paths answer no other origin at all;
  no origin is echoed otherwise, and the engine's own CORS headers never reach the client;
- keys, by what the path does:
  - client: inference and reading (API_KEYS, when set);
  - control: what changes the stack's state (unload, load, hold, release, llama-swap's
    cancel, captures, logs, profiles, Ollama's pull and delete, the dashboard's load, forget
    and log): ADMIN_KEYS when set, else
    API_KEYS; POST only (llama-swap's `GET /unload` is kept for its clients, Ollama's
    delete is a DELETE);
  - secret: what shows prompts (the model servers' `/slots`): only ADMIN_KEYS, closed when
    none is set;
  model_serve's own key (internal_key) opens everything.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from model_serve.config.settings import Settings

# What the front itself lets browsers send (preflight), and for how long they may cache it.
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, Accept, X-Api-Key, X-Requested-With"
CORS_MAX_AGE = "600"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Paths that show the log (llama-swap's /logs* too): never to another web origin.
LOG_PATHS = ("/api/model_serve/log", "/api/events")


class Access(Enum):
    PUBLIC = 0
    CLIENT = 1
    CONTROL = 2
    SECRET = 3


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    kind: str


def normalized_path(path: str) -> str:
    """The path routing decides on and the engine gets: `.`, `..` and `//` collapsed (the
    engines' clients collapse them after us, so `/x/../v1/...` would skip admission)."""
    if not path.startswith("/"):
        path = "/" + path
    if "/." not in path and "//" not in path:
        return path
    clean = posixpath.normpath(path)
    clean = "/" + clean.lstrip("/")  # normpath keeps a leading '//'
    if path.endswith("/") and clean != "/":
        clean += "/"
    return clean


def _is_slots(path: str) -> bool:
    parts = path.rstrip("/").split("/")
    return "slots" in parts[-2:]


def access_of(method: str, path: str, query: dict[str, str]) -> Access:
    """What a request needs, by its (normalized) path: see the module's docstring."""
    if path in ("/health", "/v1/health") and method in ("GET", "HEAD"):
        return Access.PUBLIC
    if (path == "/dashboard" or path.startswith("/dashboard/")) and method in ("GET", "HEAD"):
        return Access.PUBLIC  # the page's own files, the same for everyone: it asks for a key
    if _is_slots(path):
        return Access.SECRET
    last = path.rstrip("/").rpartition("/")[2]
    if last in ("props", "lora-adapters") and method not in ("GET", "HEAD"):
        return Access.CONTROL  # a model server's settings, for every client of it
    if path.startswith("/upstream/"):
        return Access.CLIENT  # read-only, or a load through admission
    if path in ("/unload", "/api/models/unload", "/api/events", "/api/pull",
                "/api/delete") or path.startswith(
            ("/api/models/unload/", "/api/model_serve/hold", "/api/model_serve/release",
             "/api/model_serve/evict", "/api/model_serve/load", "/api/model_serve/forget",
             "/api/model_serve/log",
             "/models/load", "/models/unload", "/api/inflight/", "/api/captures",
             "/logs", "/api/profiles/active")):
        return Access.CONTROL
    if path in ("/models", "/v1/models") and ("reload" in query or method not in
                                              ("GET", "HEAD")):
        return Access.CONTROL  # a reload; the router's download (POST) and delete (DELETE)
    return Access.CLIENT


def control_method_ok(method: str, path: str) -> bool:
    """Control acts on POST only (PUT where llama-swap wants it); reading logs, captures and
    events is a GET, and llama-swap documents `GET /unload` for its clients. Never a reload
    by GET, nor the router's downloads and deletes of model files (model_serve manages
    them)."""
    if path in ("/models", "/v1/models"):
        return False
    if method == "POST":
        return True
    if method == "PUT":
        return path == "/api/profiles/active"
    if method == "DELETE":
        return path == "/api/delete"
    if method == "GET":
        return path in ("/unload", "/api/events", "/api/model_serve/log") or \
            path.startswith(("/logs", "/api/captures"))
    return False


def request_key(headers: dict[str, str] | object) -> str | None:
    get = headers.get  # type: ignore[attr-defined]
    header = get("Authorization", "") or ""
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return get("x-api-key")


def host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:5847
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Gate:
    def __init__(self, settings: Settings, own_key: str | None) -> None:
        self.api_keys = frozenset(settings.api_keys)
        self.admin_keys = frozenset(settings.admin_keys)
        self.own_key = own_key
        self.origins = frozenset(o.rstrip("/").lower() for o in settings.cors_origins)
        self.hosts = {host_name(h) for h in settings.allowed_hosts}
        if settings.host not in ("", "0.0.0.0", "::"):
            self.hosts.add(host_name(settings.host))

    # --- where the request comes from --------------------------------------------------
    def host_allowed(self, host_header: str | None) -> bool:
        """An IP address cannot be rebound (the browser connected to it), and `localhost`
        names never leave the machine; any other name must be listed."""
        if not host_header:
            return True  # HTTP/1.0 without Host: no browser sends that
        name = host_name(host_header)
        return (name == "localhost" or name.endswith(".localhost") or _is_ip(name)
                or name in self.hosts or "*" in self.hosts)

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in self.origins or "*" in self.origins:
            return True
        return self.is_own_page(origin, host_header)

    def same_origin_only(self, access: Access, path: str, origin: str | None,
                         host_header: str | None) -> bool:
        """Logs and what users said to their models (the SECRET paths) are never for a page of
        another origin, CORS_ORIGINS or not: whether this request is one to refuse."""
        if origin is None or self.is_own_page(origin, host_header):
            return False
        return access is Access.SECRET or path in LOG_PATHS or path.startswith("/logs")

    def is_own_page(self, origin: str, host_header: str | None) -> bool:
        """A page the port serves itself (the dashboard, llama-swap's /ui)."""
        parts = urlsplit(origin.rstrip("/").lower())
        return bool(host_header) and parts.scheme in ("http", "https") and \
            parts.netloc == host_header.strip().lower()

    def cross_site(self, headers: dict[str, str] | object, host_header: str | None) -> bool:
        """A browser sent this from a page of another origin that CORS_ORIGINS does not list.
        Browsers send `Origin` with every cross-origin fetch and form post; an image or a
        link sends none, but modern ones send `Sec-Fetch-Site`."""
        get = headers.get  # type: ignore[attr-defined]
        origin = get("Origin")
        if origin is not None:
            return not self.origin_allowed(origin, host_header)
        return get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site")

    def opens_public_page(self, method: str, path: str, headers: dict[str, str] | object
                          ) -> bool:
        """A link on another site to the dashboard (a top-level navigation by GET): the
        page's files are the same for everyone, and the page then asks the port from its
        own origin. Framing stays refused (frame-ancestors), and so does anything else."""
        get = headers.get  # type: ignore[attr-defined]
        return access_of(method, path, {}) is Access.PUBLIC and get("Origin") is None and \
            get("Sec-Fetch-Mode", "") == "navigate" and get("Sec-Fetch-Dest", "") == "document"

    def cors_headers(self, origin: str | None, host_header: str | None) -> dict[str, str]:
        """What a reply carries for a browser: the origin echoed only when it is listed."""
        if origin is None or not self.origin_allowed(origin, host_header):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    def preflight_headers(self, origin: str, requested: str | None) -> dict[str, str]:
        allowed = [h.strip() for h in (requested or "").split(",") if _TOKEN.match(h.strip())]
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": ", ".join(allowed) or CORS_HEADERS,
                "Access-Control-Max-Age": CORS_MAX_AGE}

    # --- who asks ----------------------------------------------------------------------
    def refusal(self, access: Access, key: str | None) -> Refusal | None:
        if access is Access.PUBLIC or (self.own_key and key == self.own_key):
            return None
        if access is Access.SECRET:
            if self.admin_keys and key in self.admin_keys:
                return None
            return Refusal(403, "this endpoint shows what users said to their models: it "
                           "needs a key from ADMIN_KEYS" + ("" if self.admin_keys else
                                                            " (none is set in .env)"),
                           "forbidden")
        if access is Access.CONTROL and self.admin_keys:
            if key in self.admin_keys:
                return None
            return Refusal(401 if key is None else 403, "this control endpoint needs a key "
                           "from ADMIN_KEYS: 'Authorization: Bearer <key>'", "invalid_api_key")
        if not self.api_keys or key in self.api_keys or key in self.admin_keys:
            return None
        return Refusal(401, "a valid API key is needed: 'Authorization: Bearer <key>'",
                       "invalid_api_key")
