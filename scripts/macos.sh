# Sourced by install.sh on macOS (after messages.sh): find Homebrew and refuse Rosetta.
# apple_silicon                   true on an Apple Silicon Mac, whatever this shell's arch
# find_homebrew BREW...           put the first Homebrew found on PATH (its own shellenv)
# refuse_rosetta PYTHON           stop when the shell, PYTHON or Homebrew run as x86_64 on
#                                 Apple Silicon: they would install Intel builds without Metal

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

refuse_rosetta() {
    apple_silicon || return 0
    local fix_shell="open a native Terminal (or run 'arch -arm64 /bin/zsh') and run ./install.sh there"
    if [ "$(sysctl -n sysctl.proc_translated 2>/dev/null)" = 1 ]; then
        die "this shell runs as x86_64 under Rosetta on an Apple Silicon Mac: Homebrew would install an Intel llama.cpp without Metal" \
            "$fix_shell"
    fi
    local arch
    arch="$("$1" -c 'import platform; print(platform.machine())' 2>/dev/null || echo unknown)"
    if [ "$arch" != arm64 ]; then
        die "$1 is an $arch Python on an Apple Silicon Mac (Rosetta): models would run slowly and without Metal" \
            "remove .venv and run 'PYTHON=/opt/homebrew/bin/python3 ./install.sh' (any arm64 Python 3.10+)"
    fi
    case "$(brew --prefix 2>/dev/null || true)" in
        /usr/local)
            die "the Homebrew on PATH ($(command -v brew)) is the Intel one (in /usr/local): its llama.cpp would run under Rosetta, without Metal" \
                "install Homebrew for Apple Silicon (https://brew.sh; it goes to /opt/homebrew), then run ./install.sh again" ;;
    esac
}
