"""The one settings object: defaults, then `.env`, then the environment, validated once.

Every path the stack writes derives from these settings, so a second stack (or a test) runs
isolated by environment variables alone. The table below also generates `.env.example`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_serve.config.peers import Peer, build_peers
from model_serve.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("auto", "llama-server", "llama-swap")
BUNDLED_BRIDGE = PROJECT_ROOT / "lm-studio-ollama-bridge" / "ollama-bridge"
LM_STUDIO_MODELS = "~/.lmstudio/models"  # current LM Studio's folder (0.3 and later)


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    help: str
    kind: str = "str"  # str | int | number | path | choice | list | bool
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()


SETTINGS_TABLE: tuple[Setting, ...] = (
    Setting("LLAMA_SWAP_PORT", "5847", "Port of the OpenAI-compatible API (whichever engine runs).",
            "int", 1, 65535),
    Setting("LISTEN_HOST", "127.0.0.1",
            "Address the API binds to. Keep 127.0.0.1 unless other machines must reach it "
            "(then set API_KEYS too)."),
    Setting("API_KEYS", "", "Comma-separated API keys; when set, clients must send "
            "'Authorization: Bearer <key>'. Empty = no key needed.", "list"),
    Setting("API_KEYS_FILE", "", "A file holding API keys, one per line (keep it mode 0600), "
            "read when API_KEYS is empty; the login service gets its keys this way.", "path"),
    Setting("ADMIN_KEYS", "", "Comma-separated keys for the control endpoints (unload, load, "
            "llama-swap's logs, captures and cancel; the model servers' /slots). Empty = the "
            "API_KEYS open them, and /slots stays closed to every client.", "list"),
    Setting("ADMIN_KEYS_FILE", "", "A file holding admin keys, one per line (keep it mode "
            "0600), read when ADMIN_KEYS is empty; the login service gets its keys this way.",
            "path"),
    Setting("CORS_ORIGINS", "", "Comma-separated web origins (https://app.example:8080) whose "
            "pages may call the API from a browser. Empty = none: requests a browser sends from "
            "another site are refused, and no origin is echoed.", "list"),
    Setting("ALLOWED_HOSTS", "", "Comma-separated host names the API answers to besides "
            "localhost and IP addresses (a LAN name, host.docker.internal for Open WebUI in "
            "Docker); other Host headers are refused (DNS rebinding).", "list"),
    Setting("LLAMA_SWAP_CAPTURE_MB", "0", "Megabytes llama-swap may keep of recent requests "
            "and replies for its UI (its captureBuffer). 0 = off: it would hold prompts.",
            "int", 0, 1024),
    Setting("FRONT", "on", "model_serve's own server on the port, in front of the engine: "
            "one set of model names, llama-swap's API on every engine, exact activity, "
            "retries of dropped connections. off = the engine itself on the port.", "choice",
            choices=("on", "off")),
    Setting("ENGINE_PORT", "0", "Port of the engine behind the front, on 127.0.0.1 only "
            "(0 = LLAMA_SWAP_PORT + 1000, or - 1000 above 64535). Unused with FRONT=off.",
            "int", 0, 65535),
    Setting("ENGINE", "auto", "Engine: llama-server (router mode), llama-swap, or auto "
            "(llama-swap when it is on PATH, else llama-server).", "choice", choices=ENGINES),
    Setting("MODELS_DIR", "~/.cache/lm-studio/models",
            "Folder scanned for GGUF models; the Ollama bridge links into MODELS_DIR/ollama. "
            "Unset, it is the original LM Studio folder (this default) or current LM "
            "Studio's ~/.lmstudio/models, whichever exists; when both do, the one with "
            "models of your own (not only the bridge's links), else this default. The choice "
            "is kept (STATE_DIR/models-dir) once the stack used it.", "path"),
    Setting("MODEL_PREFIX", "ls/", "Prefix of every served model name (ls/gemma3:27.4b-q8_0)."),
    Setting("MODEL_TTL", "1800", "Seconds a model may sit idle before it is unloaded "
            "(0 = never). custom_models.yaml 'ttl' overrides it per model.", "int", 0),
    Setting("DEFAULT_CTX_SIZE", "8192", "Context size of every model unless custom_models.yaml "
            "sets ctx_size; never above the model's trained context.", "int", 256),
    Setting("DEFAULT_PARALLEL", "1", "Parallel request slots per model (llama-server -np).",
            "int", 1, 256),
    Setting("MODEL_THREADS", "0", "CPU threads of each model server (llama-server --threads); "
            "0 = llama-server's choice, one per core. With several models generating at once on "
            "few cores, 1-2 keeps them from stalling each other. sampler_args '--threads' wins.",
            "int", 0, 1024),
    Setting("MEMORY_PRESSURE_THRESHOLD", "75", "Percent of memory in use above which the pressure "
            "unloader unloads the least recently used idle model, and which no load may cross "
            "(decimals allowed).", "number", 1, 99),
    Setting("PRESSURE_CHECK_INTERVAL", "30", "Seconds between memory checks of the pressure "
            "unloader.", "int", 1),
    Setting("MIN_MODEL_AGE_SECONDS", "60", "A model used more recently than this is never "
            "unloaded for memory pressure.", "int", 0),
    Setting("LOAD_QUEUE_TIMEOUT", "120", "Seconds a request for a model that is not loaded "
            "may wait for room (every loaded model busy or recently used) before it gets HTTP "
            "503 with Retry-After.", "int", 1),
    Setting("LOAD_QUEUE_MAX", "64", "Most requests that may wait at once for a model to load "
            "(or for room); past it a request gets HTTP 429 with Retry-After at once.", "int",
            1),
    Setting("MAX_BODY_MB", "256", "Largest request body the port takes, in megabytes (long "
            "contexts and images); a larger one gets HTTP 413 before it is read whole.", "int",
            1, 4096),
    Setting("MAX_CONCURRENT_REQUESTS", "256", "Most requests the port serves at once (streams "
            "and waits included); past it HTTP 503 with Retry-After at once.", "int", 1),
    Setting("MAX_CONNECTIONS", "1024", "Most connections the port keeps open at once (idle "
            "keep-alive ones included); past it a new connection gets HTTP 503 with Retry-After "
            "and is closed.", "int", 1),
    Setting("REQUEST_READ_TIMEOUT", "120", "Seconds a client may take to send its request "
            "(head and body); a slower body gets HTTP 408, a slower head and a connection idle "
            "that long are closed.", "int", 1),
    Setting("KV_CACHE", "on", "Keep each model's conversations (its KV cache) on disk when it "
            "is unloaded, and restore the one that fits the next request when it loads again "
            "(both engines, with the front).", "choice", choices=("on", "off")),
    Setting("KV_CACHE_DIR", "", "Where saved KV caches go; empty = STATE_DIR/kv-cache.", "path"),
    Setting("KV_CACHE_MAX_GB", "10", "Disk space saved KV caches may take; the least recently "
            "used go first.", "number", 0),
    Setting("KV_CACHE_STOP_SAVE_SECONDS", "20", "At 'model stop' (and restart, and the "
            "service's stop) the loaded models' conversations are saved within this many "
            "seconds in all; what does not fit in is skipped and logged, so a stop stays "
            "within the service managers' 45 s (0 = none saved at stop).", "int", 0, 30),
    Setting("MAX_LOADED_MODELS", "0", "Most models loaded at once (0 = no limit; memory "
            "pressure decides).", "int", 0),
    Setting("PEERS", "", "Other servers whose models this port serves too, as NAME=URL pairs "
            "(comma separated): another model_serve, a llama-swap, an Ollama or any "
            "OpenAI-compatible server. Their models are served here as NAME/<their name>.",
            "str"),
    Setting("PEER_KEYS_FILE", "peer-keys", "The keys sent to the PEERS, one NAME=KEY line "
            "each, in a file only you may read (chmod 600; relative paths are relative to the "
            "project folder). A peer without a line gets no key.", "path"),
    Setting("PEER_TIMEOUT", "300", "Seconds a peer may stay silent: before its answer begins "
            "(it may be loading the model, or writing a whole answer that is not streamed) and "
            "between two pieces of a stream; then HTTP 504 naming the peer, or the stream ends "
            "with an error event. Seconds for every peer, then NAME=SECONDS for one "
            "(300,gpu=900); 0 = no limit.", "str"),
    Setting("PEER_CHECK_INTERVAL", "30", "Seconds between checks of each peer's model list "
            "(a peer that is down keeps its models listed as unavailable).", "int", 1),
    Setting("BRIDGE_SCRIPT", "", "Program that links Ollama's models into MODELS_DIR/ollama; "
            "empty = the bundled lm-studio-ollama-bridge/ollama-bridge.", "path"),
    Setting("BRIDGE_SYNC_INTERVAL", "3600", "Seconds between background syncs of Ollama's "
            "models while the stack runs (0 = only on 'model sync').", "int", 0),
    Setting("OLLAMA_MODELS", "", "Ollama's model store, which the bridge links from: the "
            "folder the Ollama server uses (the server decides where pulls go); empty = "
            "Ollama's own default (~/.ollama/models, then /usr/share/ollama/.ollama/models).",
            "path"),
    Setting("OLLAMA_HOST", "http://127.0.0.1:11434", "Where your own Ollama server answers: "
            "given to the ollama command (pull, rm, update), where the port's /api/pull and "
            "/api/delete go, and checked by 'model doctor'. Not model_serve's own port (that "
            "is what Ollama's clients set)."),
    Setting("OLLAMA_BIN", "", "Path of the ollama command (pull, rm, update); empty = look on "
            "PATH (macOS: then Homebrew's folders and Ollama.app's own copy).", "path"),
    Setting("LLAMA_SERVER_BIN", "", "Path of llama-server; empty = PATH, then the copy "
            "./install.sh built into .venv.", "path"),
    Setting("LLAMA_SWAP_BIN", "", "Path of llama-swap; empty = look on PATH.", "path"),
    Setting("RPC_SERVER_BIN", "", "Path of llama.cpp's RPC server, run by 'model worker'; "
            "empty = ggml-rpc-server (or rpc-server) beside the llama-server in use, then "
            "PATH.", "path"),
    Setting("STATE_DIR", "state", "Where generated engine configs, logs and pid files go "
            "(relative paths are relative to the project folder).", "path"),
    Setting("CUSTOM_MODELS_FILE", "custom_models.yaml", "Per-model settings file (relative "
            "paths are relative to the project folder).", "path"),
    Setting("LOG_MAX_BYTES", "10000000", "Size at which the stack's log file is rotated "
            "(three old files are kept).", "int", 100000),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS_TABLE}
# Every environment variable that changes which stack a command means, or how it runs.
STACK_VARIABLES = frozenset(SETTINGS_BY_NAME) | {"MODEL_SERVE_HOME"}


def _expand_user(raw: str, env: dict[str, str]) -> str:
    """`~` from the HOME of the environment being loaded (tests pass their own)."""
    if raw == "~" or raw.startswith("~/"):
        return env.get("HOME", os.path.expanduser("~")) + raw[1:]
    return os.path.expanduser(raw)


def _parse(setting: Setting, raw: str, source: str, home: Path, env: dict[str, str]) -> Any:
    raw = raw.strip()
    where = f"{setting.name}={raw!r} in {source}"
    if setting.kind in ("int", "number"):
        try:
            value: float = int(raw) if setting.kind == "int" else float(raw)
        except ValueError:
            kind = "a whole number" if setting.kind == "int" else "a number"
            raise ConfigError(f"{where} is not {kind}",
                              f"set {setting.name} to a number like {setting.default}") from None
        if setting.minimum is not None and value < setting.minimum:
            raise ConfigError(f"{where} is below the minimum {setting.minimum}",
                              f"set {setting.name} to at least {setting.minimum}")
        if setting.maximum is not None and value > setting.maximum:
            raise ConfigError(f"{where} is above the maximum {setting.maximum}",
                              f"set {setting.name} to at most {setting.maximum}")
        return value
    if setting.kind == "choice":
        if raw not in setting.choices:
            raise ConfigError(f"{where} is not one of {', '.join(setting.choices)}",
                              f"set {setting.name} to one of {', '.join(setting.choices)}")
        return raw
    if setting.kind == "list":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if setting.kind == "path":
        if not raw:
            return None
        path = Path(_expand_user(raw, env))
        return path if path.is_absolute() else home / path
    return raw


def project_home(environ: dict[str, str] | None = None) -> Path:
    """The folder holding `.env` and `custom_models.yaml` (MODEL_SERVE_HOME, else the checkout)."""
    env = os.environ if environ is None else environ
    home = env.get("MODEL_SERVE_HOME")
    return Path(os.path.expanduser(home)).resolve() if home else PROJECT_ROOT


@dataclass(frozen=True)
class Settings:
    home: Path
    env_file: Path
    port: int
    host: str
    api_keys: tuple[str, ...]
    admin_keys: tuple[str, ...]
    api_keys_file: Path | None  # where the keys came from (the privacy check reads it)
    admin_keys_file: Path | None
    cors_origins: tuple[str, ...]
    allowed_hosts: tuple[str, ...]
    llama_swap_capture_mb: int
    front: str
    engine_port_set: int
    engine: str
    models_dir: Path
    model_prefix: str
    model_ttl: int
    default_ctx_size: int
    default_parallel: int
    model_threads: int
    memory_pressure_threshold: float
    pressure_check_interval: int
    min_model_age_seconds: int
    load_queue_timeout: int
    load_queue_max: int
    max_body_mb: int
    max_concurrent_requests: int
    max_connections: int
    request_read_timeout: int
    kv_cache: str
    kv_cache_dir: Path
    kv_cache_max_gb: float
    kv_cache_stop_save_seconds: int
    max_loaded_models: int
    peers: tuple[Peer, ...]
    peer_keys_file: Path
    peer_check_interval: int
    bridge_script: Path
    bridge_sync_interval: int
    ollama_models: Path | None
    ollama_host: str
    ollama_bin: Path | None
    llama_server_bin: Path | None
    llama_swap_bin: Path | None
    rpc_server_bin: Path | None
    state_dir: Path
    custom_models_file: Path
    log_max_bytes: int
    user_home: Path = field(default_factory=Path.home)
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "model_serve")
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def base_url(self) -> str:
        """Where clients reach the stack: the front, or the engine with FRONT=off."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        """What model_serve sends to its own API (the front, the engine): the first key."""
        return {"Authorization": f"Bearer {self.api_keys[0]}"} if self.api_keys else {}

    @property
    def front_enabled(self) -> bool:
        return self.front == "on"

    @property
    def kv_cache_enabled(self) -> bool:
        """Saved conversations need the front (it restores them before a request) and the
        router (whose model servers it reaches by their own port)."""
        return self.kv_cache == "on" and self.front_enabled

    @property
    def engine_host(self) -> str:
        """Behind the front the engine listens on loopback only, whatever LISTEN_HOST says."""
        return "127.0.0.1" if self.front_enabled else self.host

    @property
    def engine_port(self) -> int:
        if not self.front_enabled:
            return self.port
        if self.engine_port_set:
            return self.engine_port_set
        return self.port + 1000 if self.port + 1000 <= 65535 else self.port - 1000

    @property
    def engine_url(self) -> str:
        """Where model_serve itself reaches the engine (its API, health, events)."""
        if not self.front_enabled:
            return self.base_url
        return f"http://127.0.0.1:{self.engine_port}"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "supervisor.json"

    @property
    def internal_key_file(self) -> Path:
        """The key model_serve itself uses behind the front (made anew at each start)."""
        return self.state_dir / "internal-key"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "logs" / "model_serve.log"

    @property
    def models_ini(self) -> Path:
        return self.state_dir / "models.ini"

    @property
    def llama_swap_config(self) -> Path:
        return self.state_dir / "config.yaml"

    @property
    def engine_check_file(self) -> Path:
        """Outcomes of the engine check per binary and CPU: facts about the machine, shared by
        every stack of this user."""
        return self.cache_dir / "engine-check.json"


_FIELD_OF = {
    "LLAMA_SWAP_PORT": "port", "LISTEN_HOST": "host", "API_KEYS": "api_keys", "ENGINE": "engine",
    "ENGINE_PORT": "engine_port_set",
}


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build and validate settings: environment over `.env` over defaults."""
    env = dict(os.environ if environ is None else environ)
    home = project_home(env)
    env_file = home / ".env"
    file_values: dict[str, str | None] = {}
    if env_file.is_file():
        from dotenv import dotenv_values

        try:
            file_values = dotenv_values(env_file)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {env_file}: {exc}",
                              "fix the file's permissions or encoding (UTF-8)") from exc
    unknown = sorted(k for k in file_values if k not in SETTINGS_BY_NAME)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS_TABLE:
        if setting.name in env:
            raw, source = env[setting.name], "the environment"
        elif file_values.get(setting.name) is not None:
            raw, source = str(file_values[setting.name]), str(env_file)
        else:
            raw, source = setting.default, "the defaults"
        key = _FIELD_OF.get(setting.name, setting.name.lower())
        values[key] = _parse(setting, raw, source, home, env)
        sources[setting.name] = source
    if sources["OLLAMA_HOST"] == "the environment":
        _own_ollama_not_ours(values, sources, file_values, env_file)
    if unknown:
        # A misspelt name silently falling back to a default is worse than a refusal.
        import difflib

        name = unknown[0]
        near = difflib.get_close_matches(name, SETTINGS_BY_NAME, n=1)
        hint = f"did you mean {near[0]}?" if near else "see .env.example for every setting"
        raise ConfigError(f"unknown setting {name} in {env_file}", hint)
    for keys in ("api_keys", "admin_keys"):
        keys_file, name = values[f"{keys}_file"], f"{keys.upper()}_FILE"
        if not values[keys] and keys_file is not None:
            values[keys] = _read_keys_file(keys_file, sources[name], name)
    values["peer_keys_file"] = values["peer_keys_file"] or home / "peer-keys"
    values["peers"] = build_peers(values["peers"], sources["PEERS"], values["model_prefix"],
                                  values["peer_keys_file"], sources["PEER_KEYS_FILE"],
                                  values.pop("peer_timeout"), sources["PEER_TIMEOUT"])
    if values["peers"] and values["front"] != "on":
        raise ConfigError(f"PEERS (from {sources['PEERS']}) needs the front, and FRONT=off "
                          f"(from {sources['FRONT']}): the front forwards the peers' requests",
                          "set FRONT=on, or unset PEERS")
    if values["models_dir"] is None:
        raise ConfigError("MODELS_DIR is empty", "set MODELS_DIR to the folder of your models")
    values["state_dir"] = values["state_dir"] or home / "state"
    if sources["MODELS_DIR"] == "the defaults":
        values["models_dir"] = default_models_dir(values["models_dir"], env,
                                                  values["state_dir"])
    values["kv_cache_dir"] = values["kv_cache_dir"] or values["state_dir"] / "kv-cache"
    user_home = Path(env.get("HOME") or Path.home())
    _check_kv_cache_dir(values["kv_cache_dir"], sources["KV_CACHE_DIR"], values["models_dir"],
                        user_home)
    values["custom_models_file"] = values["custom_models_file"] or home / "custom_models.yaml"
    values["bridge_script"] = values["bridge_script"] or BUNDLED_BRIDGE
    cache_root = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else user_home / ".cache"
    return Settings(home=home, env_file=env_file, sources=sources, user_home=user_home,
                    cache_dir=cache_root / "model_serve", **values)


def _own_ollama_not_ours(values: dict[str, Any], sources: dict[str, str],
                         file_values: dict[str, str | None], env_file: Path) -> None:
    """OLLAMA_HOST exported in the shell (and so in the service) is how Ollama's clients find
    a server: when it points at model_serve's own port it says where the clients go, not
    where the user's Ollama is. Then .env's OLLAMA_HOST, or Ollama's default, is the one."""
    from model_serve.config.ollama_host import points_at, server_url

    if not points_at(server_url(values["ollama_host"]), values["host"], values["port"]):
        return
    exported = values["ollama_host"]
    if file_values.get("OLLAMA_HOST") is not None:
        values["ollama_host"] = str(file_values["OLLAMA_HOST"])
        sources["OLLAMA_HOST"] = str(env_file)
    else:
        values["ollama_host"] = SETTINGS_BY_NAME["OLLAMA_HOST"].default
        sources["OLLAMA_HOST"] = "the defaults"
    sources["OLLAMA_HOST"] += (f" (the environment's OLLAMA_HOST={exported} is model_serve's "
                               "own port, for Ollama's clients)")


def _check_kv_cache_dir(folder: Path, source: str, models_dir: Path, user_home: Path) -> None:
    """Saved conversations are pruned and removed in there: never in a folder that holds the
    user's models or everything else."""
    def real(path: Path) -> Path:
        return Path(os.path.realpath(path))

    target = real(folder)
    for other, what in ((models_dir, "MODELS_DIR"), (user_home, "your home folder"),
                        (Path("/"), "the root folder")):
        if target == real(other) or target in real(other).parents:
            raise ConfigError(f"KV_CACHE_DIR={folder} (from {source}) is {what} or a folder "
                              f"above it ({other}); model_serve removes old saved "
                              "conversations there",
                              "set KV_CACHE_DIR to a folder of its own, e.g. "
                              "~/.cache/model_serve/kv-cache, or unset it")


def default_models_dir(original: Path, env: dict[str, str], state_dir: Path) -> Path:
    """The original LM Studio folder or current LM Studio's (config/models_dir.py)."""
    from model_serve.config.models_dir import choose_models_dir

    return choose_models_dir(original, Path(_expand_user(LM_STUDIO_MODELS, env)), state_dir)


def _read_keys_file(path: Path, source: str, name: str) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}={path} (from {source}) cannot be read: {exc}",
                          "fix the path or the file's permissions") from exc
    keys = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not keys:
        raise ConfigError(f"{name}={path} (from {source}) holds no key",
                          f"put one key per line in it, or unset {name}")
    return keys


def keys_files_open_to_others(settings: Settings) -> list[tuple[Path, str]]:
    """A warning per keys file (API_KEYS_FILE, ADMIN_KEYS_FILE) that other users may read.
    Warned of, not refused as PEER_KEYS_FILE is: these were accepted before, and a refusal
    would stop an install (its service restarting for ever) at an upgrade."""
    warnings = []
    for name, path in (("API_KEYS_FILE", settings.api_keys_file),
                       ("ADMIN_KEYS_FILE", settings.admin_keys_file)):
        try:
            mode = stat.S_IMODE(path.stat().st_mode) if path is not None else 0
        except OSError:
            continue
        if mode & 0o077:
            said = (f"{name}={path} may be read by other users of this machine (mode "
                    f"{mode:o}): anyone who reads it can use this server; run "
                    f"'chmod 600 {path}'")
            warnings.append((path, said))
    return warnings


def env_example() -> str:
    """The text of `.env.example`, generated from the table so the two never disagree."""
    lines = [
        "# model_serve settings. Copy to .env and change what you need;",
        "# the environment overrides .env, and .env overrides these defaults.",
        "",
    ]
    for setting in SETTINGS_TABLE:
        lines.append(f"# {setting.help}")
        lines.append(f"{setting.name}={setting.default}")
        lines.append("")
    return "\n".join(lines)

