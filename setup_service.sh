#!/usr/bin/env bash
# Runs the stack as a per-user service: started at login, restarted after a crash.
# Linux: a systemd user unit; macOS: a launchd agent. Never needs root.
# The files are rendered by model_serve/service/files.py; this script only runs the managers.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./setup_service.sh install|uninstall|start|stop|status
  install    write the service file, start the stack now and at every login
  uninstall  stop the service and remove the file install wrote (nothing else)
  start      start the service (macOS: restart it when it runs)
  stop       stop the stack until the next start or login
  status     show the service, then 'model status' (exit 0 running, 3 not running)
The service runs the stack this shell's settings describe (MODEL_SERVE_HOME, .env and any
setting exported here, such as LLAMA_SWAP_PORT); another port gets its own service.
No systemd or launchd (e.g. in a container)? './setup_cron.sh start' keeps the stack up hourly.
USAGE
}

here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/messages.sh
. "$here/scripts/messages.sh"

if [ $# -ne 1 ]; then usage >&2; exit 2; fi
case "$1" in
    install|uninstall|start|stop|status) action="$1" ;;
    -h|--help) usage; exit 0 ;;
    *) printf 'error: unknown command %s\n' "$1" >&2; usage >&2; exit 2 ;;
esac

model="$here/model"
python="$here/.venv/bin/python"
cron_advice="use '$here/setup_cron.sh start' instead: an hourly cron job that starts the stack when it is down"
[ -x "$python" ] || die "$here/.venv is missing" "run $here/install.sh first"

files() { "$python" -m model_serve.service.files "$@"; }

stack_runs() { "$model" status >/dev/null 2>&1; }

free_the_port() {  # only called when the service itself does not run the stack
    if stack_runs; then
        say "stopping the stack that './model start' runs, so the service can take its port"
        "$model" stop
    fi
}

report_carried() {
    local carried
    carried="$(files carried)"
    if [ -n "$carried" ]; then
        say "taken from this shell (its settings, and programs as its PATH finds them): $carried"
    fi
}

model_status() {
    local rc=0
    "$model" status || rc=$?
    exit "$rc"
}

require_installed() {  # $1 = systemd | launchd
    case "$(files check "$1")" in
        ours) ;;
        absent) die "the service is not installed ($service_file does not exist)" \
                    "run '$here/setup_service.sh install'" ;;
        *) die "$service_file was not written by model_serve" "move it away, then install" ;;
    esac
}

# --- Linux: systemd user unit -----------------------------------------------------------------
linger() {
    local user
    user="$(id -un)"
    if ! command -v loginctl >/dev/null 2>&1; then
        say "to keep the stack running after you log out: loginctl enable-linger $user"
    elif [ "$(loginctl show-user "$user" --property=Linger --value 2>/dev/null || true)" = yes ]; then
        say "lingering is on for $user: the service keeps running after you log out"
    elif loginctl enable-linger "$user" >/dev/null 2>&1; then
        say "turned on lingering for $user: the service keeps running after you log out"
    else
        say "the service stops when you log out; to keep it running: sudo loginctl enable-linger $user"
    fi
}

systemd_active() { systemctl --user is-active --quiet "$service"; }

systemd_main() {
    command -v systemctl >/dev/null 2>&1 \
        || die "systemctl was not found, so there is no systemd to run the service (containers and WSL often lack it)" "$cron_advice"
    local why
    if ! why="$(systemctl --user show-environment 2>&1 >/dev/null)"; then
        die "systemd's user manager is not reachable (systemctl --user: ${why:-no answer})" \
            "log in through a normal session (desktop or ssh), or $cron_advice"
    fi
    service="$(files name systemd)"
    service_file="$(files path systemd)"
    case "$action" in
    install)
        local was_active=0 changed
        if systemd_active; then was_active=1; fi
        changed="$(files write systemd)"
        say "$service_file ($changed)"
        report_carried
        if [ "$was_active" = 0 ]; then free_the_port; fi
        systemctl --user daemon-reload
        systemctl --user enable --now "$service"
        if [ "$was_active" = 1 ] && [ "$changed" = changed ]; then
            systemctl --user restart "$service"  # it ran the old unit
        fi
        say "$service is enabled: the stack runs now, at every login, and again 5 s after a crash"
        linger
        say "logs: '$model logs' (the service manager's own: journalctl --user -u $service)"
        ;;
    uninstall)
        case "$(files check systemd)" in
            absent) say "$service is not installed ($service_file does not exist)"; return 0 ;;
            foreign) die "$service_file was not written by model_serve; it was left alone" \
                         "remove it yourself if it is an old copy" ;;
        esac
        systemctl --user disable --now "$service" \
            || say "systemctl could not disable $service; removing its file anyway"
        files remove systemd >/dev/null
        systemctl --user daemon-reload
        say "removed $service_file; the stack is stopped"
        ;;
    start)
        require_installed systemd
        if ! systemd_active; then free_the_port; fi
        systemctl --user start "$service"
        say "started $service; '$here/setup_service.sh status' shows it"
        ;;
    stop)
        require_installed systemd
        systemctl --user stop "$service"
        say "stopped $service (it starts again at the next login)"
        ;;
    status)
        if [ "$(files check systemd)" = ours ]; then
            systemctl --user status --no-pager "$service" || true
        else
            say "$service is not installed"
        fi
        model_status
        ;;
    esac
}

# --- macOS: launchd agent ---------------------------------------------------------------------
launchd_loaded() { launchctl print "$domain/$service" >/dev/null 2>&1; }

launchd_running() {  # grep reads all: with -q it could exit early, and pipefail would see SIGPIPE
    launchctl print "$domain/$service" 2>/dev/null | grep 'state = running' >/dev/null
}

launchd_load() {
    # bootstrap refuses a disabled service; `enable` clears what an old `unload -w` left.
    launchctl enable "$domain/$service" 2>/dev/null || true
    local why
    if why="$(launchctl bootstrap "$domain" "$service_file" 2>&1)"; then return 0; fi
    say "launchctl bootstrap failed (${why:-no message}); trying once more in 2 s"
    sleep 2
    launchctl bootstrap "$domain" "$service_file" \
        || die "launchctl could not load $service_file (see its message above)" \
               "run 'launchctl print $domain/$service' and '$model logs'; then '$here/setup_service.sh install' again"
}

launchd_unload() {
    launchctl bootout "$domain/$service" 2>/dev/null || true
    # bootout returns before launchd lets go of the service, which has the plist's ExitTimeOut
    # for its orderly stop (saving conversations) before launchd kills it; a bootstrap until
    # then fails with "Bootstrap failed: 5: Input/output error" and leaves the agent unloaded.
    launchd_loaded || return 0
    local waited=0 limit
    limit=$(( $(files stop-timeout) + 5 ))
    say "waiting for launchd to stop the old agent (the stack may take up to $limit s)"
    while launchd_loaded; do
        if [ "$waited" -ge $((limit * 5)) ]; then  # steps of 0.2 s
            say "warning: $service is still loaded $limit s after bootout"
            return 0
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
}

launchd_main() {
    command -v launchctl >/dev/null 2>&1 \
        || die "launchctl was not found, so there is no launchd to run the service" "$cron_advice"
    service="$(files name launchd)"
    service_file="$(files path launchd)"
    domain="gui/$(id -u)"
    case "$action" in
    install)
        local changed
        changed="$(files write launchd)"
        say "$service_file ($changed)"
        report_carried
        "$python" -m model_serve.service.privacy privacy || true
        if ! launchd_running; then free_the_port; fi
        if ! launchd_loaded; then
            launchd_load
        elif [ "$changed" = changed ]; then
            launchd_unload  # it ran the old plist
            launchd_load
        elif ! launchd_running; then
            launchctl kickstart "$domain/$service"
        fi
        say "$service is loaded: the stack runs now, at every login, and again after a crash"
        say "logs: '$model logs' (launchd's own output goes to launchd.log beside that log)"
        ;;
    uninstall)
        case "$(files check launchd)" in
            absent) say "$service is not installed ($service_file does not exist)"; return 0 ;;
            foreign) die "$service_file was not written by model_serve; it was left alone" \
                         "remove it yourself if it is an old copy" ;;
        esac
        launchd_unload
        files remove launchd >/dev/null
        say "removed $service_file; the stack is stopped"
        ;;
    start)
        require_installed launchd
        if ! launchd_running; then free_the_port; fi
        if launchd_loaded; then
            launchctl kickstart -k "$domain/$service"
        else
            launchd_load  # RunAtLoad starts it
        fi
        say "started $service; '$here/setup_service.sh status' shows it"
        ;;
    stop)
        require_installed launchd
        # The supervisor exits 0 on TERM, and KeepAlive restarts only after a failed exit.
        "$model" stop
        ;;
    status)
        if [ "$(files check launchd)" != ours ]; then
            say "$service is not installed"
        elif launchd_loaded; then
            say "$service is loaded"
            launchctl print "$domain/$service" 2>/dev/null \
                | grep -E '^[[:space:]]*(state|pid|last exit code) =' || true
        else
            say "$service is installed but not loaded (it loads at the next login)"
        fi
        model_status
        ;;
    esac
}

case "$(uname -s)" in
    Darwin) launchd_main ;;
    Linux) systemd_main ;;
    *) die "$(uname -s) has neither systemd nor launchd support here" "$cron_advice" ;;
esac
