#!/usr/bin/env bash
# Hourly keep-alive where no systemd or launchd runs (containers): a crontab line that starts the
# stack when 'model status' says it is down. Only the line carrying our marker is ever touched.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./setup_cron.sh [start|stop|status]
  start    add the hourly keep-alive line to your crontab and start the stack now
  stop     remove that line and stop the stack now
  status   (also with no argument) show whether the line is installed and the stack runs;
           exit 0 running, 3 not running
The line runs the stack this shell's settings describe (MODEL_SERVE_HOME, .env and any
setting exported here, such as LLAMA_SWAP_PORT); each port gets its own line.
USAGE
}

here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/messages.sh
. "$here/scripts/messages.sh"

if [ $# -gt 1 ]; then usage >&2; exit 2; fi
case "${1:-status}" in
    start|stop|status) action="${1:-status}" ;;
    -h|--help) usage; exit 0 ;;
    *) printf 'error: unknown command %s\n' "$1" >&2; usage >&2; exit 2 ;;
esac

model="$here/model"
python="$here/.venv/bin/python"
[ -x "$python" ] || die "$here/.venv is missing" "run $here/install.sh first"
command -v crontab >/dev/null 2>&1 \
    || die "crontab was not found, so no cron job can be added" \
           "install cron (Debian/Ubuntu: apt-get install cron; Fedora: dnf install cronie), or use '$here/setup_service.sh install' where systemd or launchd runs"

files() { "$python" -m model_serve.service.files "$@"; }
marker="$(files name cron)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

read_table() {  # the current crontab into $tmp/old; empty when the user has none yet
    if ! crontab -l >"$tmp/old" 2>"$tmp/err"; then
        grep -qi 'no crontab' "$tmp/err" \
            || die "crontab -l failed: $(cat "$tmp/err")" "fix the error above; nothing was changed"
        : >"$tmp/old"
    fi
    grep -vF -- "$marker" "$tmp/old" >"$tmp/others" || true
}

line_installed() { grep -qF -- "$marker" "$tmp/old"; }

add_line() {
    local line
    line="$(files render cron)"
    read_table
    if [ "$(grep -cF -- "$marker" "$tmp/old" || true)" = 1 ] && grep -qxF -- "$line" "$tmp/old"; then
        say "the hourly keep-alive line is already in your crontab"
        return 0
    fi
    cp "$tmp/others" "$tmp/new"
    printf '%s\n' "$line" >>"$tmp/new"
    crontab "$tmp/new"
    say "added the hourly keep-alive line to your crontab ($marker)"
    local carried
    carried="$(files carried)"
    if [ -n "$carried" ]; then say "taken from this shell (its settings, and programs as its PATH finds them): $carried"; fi
}

remove_line() {
    read_table
    if ! line_installed; then
        say "no keep-alive line in your crontab ($marker)"
        return 0
    fi
    crontab "$tmp/others"
    say "removed the keep-alive line from your crontab; other lines are unchanged"
}

warn_without_cron_daemon() {  # containers often have crontab but no daemon to read it
    [ "$(uname -s)" = Linux ] || return 0
    command -v pgrep >/dev/null 2>&1 || return 0
    if ! pgrep -x cron >/dev/null 2>&1 && ! pgrep -x crond >/dev/null 2>&1; then
        say "note: no cron daemon seems to run here, so nothing runs the line yet;" \
            "start one (Debian/Ubuntu: service cron start)"
    fi
}

case "$action" in
start)
    add_line
    warn_without_cron_daemon
    if [ "$(uname -s)" = Darwin ]; then "$python" -m model_serve.service.privacy privacy || true; fi
    "$model" start
    ;;
stop)
    remove_line
    "$model" stop
    ;;
status)
    read_table
    if line_installed; then
        say "cron keep-alive: installed ($marker)"
    else
        say "cron keep-alive: not installed"
    fi
    rc=0
    "$model" status || rc=$?
    exit "$rc"
    ;;
esac
