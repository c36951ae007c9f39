# Sourced by install.sh --dev on Linux (after messages.sh; uses its `confirm` and YES): the
# dashboard's browser test drives Debian's Chromium and chromedriver. Never on a user's Mac,
# never without --dev. A machine where they cannot be installed (no apt-get, no root, no
# network, a distribution without a `chromium` package) still gets the rest of the install:
# this says what is missing and how to get it; tests/test_dashboard.py then fails under CI.
# install_test_browser            find them, or install them with apt-get (asks first)

test_browser_found() {
    { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; } \
        && command -v chromedriver >/dev/null
}

test_browser_missing() {
    printf 'warning: %s\n' "$1" >&2
    printf '  missing: Chromium and chromedriver, which tests/test_dashboard.py drives (it fails without them under CI)\n' >&2
    printf '  fix: %s\n' "$2" >&2
}

install_test_browser() {
    local by_hand="sudo apt-get install chromium chromium-driver (elsewhere: your system's Chromium and its chromedriver on PATH), then ./install.sh --dev again"
    local sudo=""  # a word list, split on purpose where used
    if test_browser_found; then
        say "test browser found: $(command -v chromium || command -v chromium-browser) and $(command -v chromedriver)"
        return 0
    fi
    if ! command -v apt-get >/dev/null; then
        test_browser_missing "no apt-get here: the test browser was not installed" "$by_hand"
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        if ! command -v sudo >/dev/null; then
            test_browser_missing "installing with apt-get needs root, and sudo is not here" \
                "as root: apt-get install chromium chromium-driver; then ./install.sh --dev again"
            return 0
        fi
        sudo="sudo"
        [ "$YES" = 1 ] && sudo="sudo -n"  # never wait for a password nobody will type
    fi
    if ! confirm "Install Debian's chromium and chromium-driver (apt-get) for the dashboard's browser test?"; then
        test_browser_missing "the test browser was not installed (declined)" "$by_hand"
        return 0
    fi
    say "installing chromium and chromium-driver with apt-get (about 30 s)"
    if ! { $sudo apt-get update -qq \
            && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                chromium chromium-driver >/dev/null; } \
            || ! test_browser_found; then
        test_browser_missing "apt-get could not install chromium and chromium-driver (no network, no root, or no such packages here: see its message above)" "$by_hand"
        return 0
    fi
    say "test browser ready: $(command -v chromium || command -v chromium-browser) and $(command -v chromedriver)"
}
