"""Model management through Ollama: pull, rm and update run the `ollama` command (so its own
progress display is what the user sees), then a sync makes the served side follow."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from model_serve.config.ollama_host import points_at, server_url
from model_serve.config.settings import Settings
from model_serve.errors import ConfigError, ModelServeError
from model_serve.models.catalog import Catalog

INSTALL_HINT = ("install Ollama from https://ollama.com/download (macOS: brew install ollama), "
                "or set OLLAMA_BIN")


# Ollama.app keeps its CLI inside the bundle; the link in /usr/local/bin exists only when the
# user accepted the app's offer (an administrator's password) at its first launch.
APP_CLI = Path("Ollama.app/Contents/Resources/ollama")


def app_cli(user_home: Path, platform: str = sys.platform,
            roots: tuple[Path, ...] = (Path("/Applications"),)) -> Path | None:
    """The CLI inside Ollama.app (in /Applications or ~/Applications), on macOS."""
    if platform != "darwin":
        return None
    for root in (*roots, user_home / "Applications"):
        if os.access(root / APP_CLI, os.X_OK):
            return root / APP_CLI
    return None


def ollama_binary(settings: Settings) -> Path:
    if settings.ollama_bin is not None:
        if not os.access(settings.ollama_bin, os.X_OK):
            raise ModelServeError(f"OLLAMA_BIN={settings.ollama_bin} is not an executable file",
                                  "fix OLLAMA_BIN in .env or unset it to search PATH")
        return settings.ollama_bin
    from model_serve.programs import find_on_path

    found = find_on_path("ollama") or app_cli(settings.user_home)
    if not found:
        raise ModelServeError("the ollama command was not found", INSTALL_HINT)
    return found


def points_at_model_serve(settings: Settings) -> bool:
    """OLLAMA_HOST is also what Ollama's clients use to find a server, so it may have been
    set to model_serve's own port: model_serve would then call itself for pulls."""
    return points_at(server_url(settings.ollama_host), settings.host, settings.port)


SELF_HINT = ("set OLLAMA_HOST in model_serve's .env to where your own Ollama serves (its "
             "default is http://127.0.0.1:11434); Ollama's clients keep their own OLLAMA_HOST "
             "pointing at model_serve")


def normalize(name: str) -> str:
    """An Ollama name in its display form with a tag: 'gemma3' -> 'gemma3:latest'."""
    name = name.strip()
    if name.startswith("registry.ollama.ai/"):
        name = name[len("registry.ollama.ai/"):]
    if name.startswith("library/"):
        name = name[len("library/"):]
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def manifest_path(store: Path, name: str) -> Path:
    """Where a model's manifest lies in a store: manifests/<host>/<namespace>/<model>/<tag>."""
    path, _, tag = normalize(name).rpartition(":")
    parts = path.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    return store.joinpath("manifests", *parts, tag)


def server_models(settings: Settings) -> list[str] | None:
    """What the Ollama server at OLLAMA_HOST lists (GET /api/tags); None when it does not answer."""
    import requests

    try:
        reply = requests.get(server_url(settings.ollama_host) + "/api/tags", timeout=3)
        return [str(m.get("name", "")) for m in reply.json().get("models", [])]
    except (requests.RequestException, ValueError, AttributeError):
        return None


def check_pulled_into(settings: Settings, name: str, store: str | None) -> None:
    """After a pull: the server must have put the model where the bridge looks."""
    if store and manifest_path(Path(store), name).exists():
        return
    raise ModelServeError(
        f"ollama pulled {name}, but the Ollama store model_serve links from "
        f"({store or 'none found'}) does not have it: the Ollama server at "
        f"{settings.ollama_host} keeps its models in another folder",
        "set OLLAMA_MODELS in .env to the folder that server uses (its own OLLAMA_MODELS; "
        "Linux's system service uses /usr/share/ollama/.ollama/models), then 'model sync'")


def cli_environment(settings: Settings) -> dict[str, str]:
    """The CLI is a client of the server: OLLAMA_HOST says which server (where models go is
    the server's own OLLAMA_MODELS; ours would change nothing). Given as model_serve reads it,
    with its port: Ollama's CLI reads `http://host` without one as port 80, not 11434, so
    `model pull` and the port's /api/pull would reach two servers."""
    return {**os.environ, "OLLAMA_HOST": server_url(settings.ollama_host)}


def run_ollama(settings: Settings, *args: str,
               capture: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `ollama ARGS` with the user's terminal (progress bars) unless `capture`."""
    binary = ollama_binary(settings)
    if points_at_model_serve(settings):
        raise ConfigError(f"OLLAMA_HOST={settings.ollama_host} points at model_serve itself, "
                          "not at your Ollama", SELF_HINT)
    try:
        return subprocess.run([str(binary), *args], env=cli_environment(settings), text=True,
                              capture_output=capture, check=False)
    except OSError as exc:
        raise ModelServeError(f"{binary} could not run: {exc}", INSTALL_HINT) from exc


def _failed(action: str, name: str,
            result: subprocess.CompletedProcess[str]) -> ModelServeError:
    detail = (result.stderr or "").strip().splitlines()[-1:] if result.stderr else []
    text = f": {detail[0]}" if detail else f" (exit code {result.returncode}; see above)"
    hint = "check the name on https://ollama.com/library, and that Ollama is running"
    if "could not connect" in "".join(detail).lower():
        hint = "start Ollama (macOS: open the app; Linux: 'ollama serve' or systemctl start ollama)"
    return ModelServeError(f"ollama {action} {name} failed{text}", hint)


def pull(settings: Settings, name: str) -> None:
    result = run_ollama(settings, "pull", name)
    if result.returncode != 0:
        raise _failed("pull", name, result)


def remove(settings: Settings, name: str) -> None:
    result = run_ollama(settings, "rm", name, capture=True)
    if result.returncode != 0:
        raise _failed("rm", name, result)


@dataclass
class OllamaModel:
    name: str  # Ollama's display name with tag
    served: str  # the served name
    size_bytes: int
    quant: str


def ollama_models(catalog: Catalog) -> list[OllamaModel]:
    found = []
    for model in catalog.models:
        for name in model.ollama_names:
            found.append(OllamaModel(name, model.name, model.size_bytes, model.info.file_type))
    return sorted(found, key=lambda m: m.name.lower())


def resolve(catalog: Catalog, name: str) -> list[OllamaModel]:
    """The Ollama models meant by `name`: an Ollama name (tag optional) or a served name."""
    wanted = normalize(name).lower()
    models = ollama_models(catalog)
    exact = [m for m in models if m.name.lower() == wanted]
    if exact:
        return exact
    served = catalog.find(name)
    return [m for m in models if served is not None and m.served == served.name]


def removal_targets(catalog: Catalog, name: str | None,
                    filter_text: str | None) -> list[OllamaModel]:
    if filter_text:
        needle = filter_text.lower()
        targets = [m for m in ollama_models(catalog)
                   if needle in m.name.lower() or needle in m.served.lower()]
    elif name:
        targets = resolve(catalog, name)
    else:
        raise ConfigError("name a model or pass --filter TEXT", "model rm gemma3:27b")
    if not targets:
        what = f"matching '{filter_text}'" if filter_text else f"named '{name}'"
        raise ConfigError(f"no Ollama model {what}", "run 'model list' to see the names")
    return targets


def blobs_by_name(catalog: Catalog) -> dict[str, str]:
    """Ollama name -> the blob its model layer is (changes when an update brings new weights)."""
    return {name: os.path.realpath(model.path)
            for model in catalog.models for name in model.ollama_names}
