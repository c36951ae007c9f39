# Sourced by install.sh, setup_service.sh and setup_cron.sh: one look for progress and errors.
# say TEXT...        a progress line
# die WHAT [FIX]     an error naming what went wrong and how to fix it; exits 1
say() { printf '==> %s\n' "$*"; }
die() {
    printf 'error: %s\n' "$1" >&2
    if [ -n "${2:-}" ]; then printf '  fix: %s\n' "$2" >&2; fi
    exit 1
}
