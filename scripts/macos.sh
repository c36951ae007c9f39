# Sourced by install.sh on macOS (after messages.sh), before Python is chosen or .venv built.
# macos_preflight                 all of the below, in order; sets PYTHON
# apple_silicon                   true on an Apple Silicon Mac, whatever this shell's arch
# find_homebrew BREW...           put the first Homebrew found on PATH (its own shellenv)
# choose_python                   PYTHON: the user's, else python3 on PATH when 3.10+, else
#                                 Homebrew's python3 (the Command Line Tools' python3 is 3.9)
# refuse_rosetta PYTHON           stop when the shell, PYTHON or Homebrew run as x86_64 on
#                                 Apple Silicon: they would install Intel builds without Metal

macos_preflight() {
    find_homebrew /opt/homebrew/bin/brew /usr/local/bin/brew \
        || die "Homebrew is needed to install Python, llama.cpp and llama-swap on macOS (not on PATH, not in /opt/homebrew or /usr/local)" \
               "install it from https://brew.sh, then run ./install.sh again"
    refuse_rosetta_shell
    choose_python
    refuse_rosetta "$PYTHON"
    if apple_silicon && [ -x .venv/bin/python ] \
            && [ "$(python_arch .venv/bin/python)" = x86_64 ]; then
        die ".venv was made by an x86_64 Python under Rosetta: its packages are Intel builds" \
            "remove it (rm -rf .venv) and run ./install.sh again in a native Terminal"
    fi
    if [ -x .venv/bin/python ] && ! new_enough_python .venv/bin/python; then
        die ".venv was made by $(.venv/bin/python --version 2>&1), older than 3.10" \
            "remove it (rm -rf .venv) and run ./install.sh again: it uses $PYTHON"
    fi
}

new_enough_python() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }

python_version() { command -v "$1" >/dev/null && "$1" --version 2>&1 || echo missing; }

python_arch() { "$1" -c 'import platform; print(platform.machine())' 2>/dev/null || echo unknown; }

choose_python() {
    [ -n "${PYTHON:-}" ] && return 0
    PYTHON=python3
    if command -v python3 >/dev/null && new_enough_python python3; then return 0; fi
    # Homebrew links its Pythons next to brew (<prefix>/bin; the Cellar path changes each
    # upgrade): python3 for its main one, only python3.y for another (brew install python@3.12).
    local brew_bin name
    brew_bin="$(dirname "$(command -v brew)")"
    for name in python3 python3.14 python3.13 python3.12 python3.11 python3.10; do
        if [ -x "$brew_bin/$name" ] && new_enough_python "$brew_bin/$name"; then
            say "Python: $brew_bin/$name (Homebrew's; python3 on PATH is $(python_version python3))"
            PYTHON="$brew_bin/$name"
            return 0
        fi
    done
    die "Python 3.10 or newer is needed: python3 on PATH is $(python_version python3), and Homebrew has none" \
        "brew install python, then run ./install.sh again (or point PYTHON=/path/to/python3.11 at one)"
}

apple_silicon() { [ "$(sysctl -n hw.optional.arm64 2>/dev/null)" = 1 ]; }

find_homebrew() {
    # brew's place is on PATH only when the user's profile runs `brew shellenv`; on Apple
    # Silicon /opt/homebrew wins over an Intel Homebrew in /usr/local that PATH may list.
    local candidate
    for candidate in "$@"; do
        if [ -x "$candidate" ]; then
            eval "$("$candidate" shellenv)"
            hash -r
            say "Homebrew: $candidate"
            return 0
        fi
    done
    if command -v brew >/dev/null; then
        say "Homebrew: $(command -v brew)"
        return 0
    fi
    return 1
}

refuse_rosetta_shell() {
    apple_silicon || return 0
    if [ "$(sysctl -n sysctl.proc_translated 2>/dev/null)" = 1 ]; then
        die "this shell runs as x86_64 under Rosetta on an Apple Silicon Mac: Homebrew would install an Intel llama.cpp without Metal, and .venv would get Intel packages" \
            "open a native Terminal (or run 'arch -arm64 /bin/zsh') and run ./install.sh there; remove a .venv made under Rosetta first (rm -rf .venv)"
    fi
}

refuse_rosetta() {
    apple_silicon || return 0
    refuse_rosetta_shell
    local arch
    arch="$(python_arch "$1")"
    if [ "$arch" != arm64 ]; then
        die "$1 is an $arch Python on an Apple Silicon Mac (Rosetta): models would run slowly and without Metal" \
            "run 'PYTHON=/opt/homebrew/bin/python3 ./install.sh' (any arm64 Python 3.10+); remove a .venv made with it first (rm -rf .venv)"
    fi
    case "$(brew --prefix 2>/dev/null || true)" in
        /usr/local)
            die "the Homebrew on PATH ($(command -v brew)) is the Intel one (in /usr/local): its llama.cpp would run under Rosetta, without Metal" \
                "install Homebrew for Apple Silicon (https://brew.sh; it goes to /opt/homebrew), then run ./install.sh again" ;;
    esac
}
