"""llama.cpp's RPC server, which `model worker` runs: where it is, and what options it has.

Builds with `-DGGML_RPC=ON` ship it beside llama-server: named `ggml-rpc-server` in current
llama.cpp, `rpc-server` in older ones. Homebrew's llama.cpp links Homebrew's ggml, which is
built without RPC, so a Mac using it has none.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path

from model_serve.config.settings import Settings
from model_serve.engines.server_options import binary_stamp
from model_serve.errors import EngineError
from model_serve.fileio import write_if_changed
from model_serve.programs import find_on_path

NAMES = ("ggml-rpc-server", "rpc-server")
NO_RPC_HINT = ("run ./install.sh (its llama.cpp build has RPC); on a Mac, Homebrew's llama.cpp "
               "has no RPC server: build llama.cpp with -DGGML_RPC=ON and set RPC_SERVER_BIN "
               "(and LLAMA_SERVER_BIN) to its bin/ folder's programs")
_OPTION = re.compile(r"^\s+(-\w)?,?\s*(--[\w-]+)", re.MULTILINE)


def find_rpc_server(settings: Settings) -> Path:
    """RPC_SERVER_BIN, else the RPC server beside the llama-server in use, else on PATH."""
    if settings.rpc_server_bin is not None:
        if not os.access(settings.rpc_server_bin, os.X_OK):
            raise EngineError(f"RPC_SERVER_BIN={settings.rpc_server_bin} is not an executable "
                              "file", "fix RPC_SERVER_BIN in .env or unset it")
        return settings.rpc_server_bin
    from model_serve.engines.llama_server import resolve_llama_server

    try:
        folder = resolve_llama_server(settings.llama_server_bin).parent
    except EngineError:
        folder = None
    for name in NAMES:
        if folder is not None and os.access(folder / name, os.X_OK):
            return folder / name
    for name in NAMES:
        found = find_on_path(name)
        if found:
            return found
    beside = f" beside {folder}/llama-server" if folder else ""
    raise EngineError(f"llama.cpp's RPC server (ggml-rpc-server or rpc-server) was not "
                      f"found{beside}, on PATH or in RPC_SERVER_BIN", NO_RPC_HINT)


def rpc_server_options(binary: Path, cache_dir: Path) -> set[str]:
    """The long options this build's RPC server lists in its --help (e.g. {'--threads'}),
    cached per binary as llama-server's are."""
    cache = cache_dir / "rpc-server-options.json"
    stamp = binary_stamp(binary)
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("stamp") == stamp and isinstance(data.get("options"), list):
            return set(data["options"])
    except (OSError, ValueError, AttributeError):
        pass
    try:
        done = subprocess.run([str(binary), "--help"], capture_output=True, text=True,
                              timeout=15, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"{binary} --help did not answer: {exc}",
                          "check that the RPC server runs on this machine, or set "
                          "RPC_SERVER_BIN") from exc
    options = {match.group(2) for match in _OPTION.finditer(done.stdout + done.stderr)}
    if "--port" not in options:  # not an RPC server, or one that failed: ask again next time
        raise EngineError(f"{binary} --help lists no --port option (exit {done.returncode}): "
                          f"{(done.stderr or done.stdout).strip()[:300]}",
                          "check that it is llama.cpp's RPC server and runs here, or set "
                          "RPC_SERVER_BIN")
    with contextlib.suppress(OSError):  # only a cache
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_if_changed(cache, json.dumps({"stamp": stamp, "options": sorted(options)}))
    return options
