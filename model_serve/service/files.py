"""The files that keep the stack running without a terminal: a systemd user unit (Linux), a
launchd agent plist (macOS) and a crontab line (anywhere else).

`setup_service.sh` and `setup_cron.sh` call the small command line at the bottom
(`python -m model_serve.service.files ACTION KIND`); they only run systemctl, launchctl and
crontab. Everything here is rendered from the settings of the calling shell, so the service runs
the same stack that `./model status` shows there.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from model_serve.config.settings import PROJECT_ROOT, SETTINGS_TABLE, Settings, project_home
from model_serve.errors import ConfigError, ModelServeError

DEFAULT_PORT = 5847
KINDS = ("systemd", "launchd", "cron")
FILE_KINDS = ("systemd", "launchd")
# First line of every file we write; only a file carrying it is ever replaced or removed.
MARKER = "Written by model_serve's setup_service.sh; './setup_service.sh uninstall' removes it."
# launchd and cron start programs with a bare PATH; Homebrew's llama.cpp/llama-swap live here.
SERVICE_PATH = "/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
STOP_TIMEOUT = 45  # seconds the service manager waits for the supervisor's orderly stop
RESTART_DELAY = 5


@dataclass(frozen=True)
class ServiceSpec:
    """What every service file needs: which checkout runs, on which port, with which settings."""

    checkout: Path
    port: int
    log_dir: Path
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def program(self) -> Path:
        return self.checkout / "model"


def carried_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Settings the calling shell sets in its environment: the service must see them too,
    or it would run another stack (another port, home or models folder) than the shell's."""
    carried: dict[str, str] = {}
    if environ.get("MODEL_SERVE_HOME"):
        carried["MODEL_SERVE_HOME"] = str(project_home(dict(environ)))
    for setting in SETTINGS_TABLE:
        if setting.name in environ:
            carried[setting.name] = environ[setting.name]
    return carried


# Programs the service must run as this shell finds them: its bare PATH may find others, or
# none (MacPorts, ~/bin, a source build), and ENGINE=auto could then pick another engine.
PROGRAM_SETTINGS = {"LLAMA_SERVER_BIN": "llama-server", "LLAMA_SWAP_BIN": "llama-swap",
                    "OLLAMA_BIN": "ollama"}


def resolved_programs(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """LLAMA_SERVER_BIN, LLAMA_SWAP_BIN, OLLAMA_BIN as this shell's PATH resolves them, for
    those not set already (in .env, which the service reads too, or in the shell)."""
    from model_serve.programs import find_on_path

    found = {}
    for name, program in PROGRAM_SETTINGS.items():
        if name in environ or getattr(settings, name.lower()) is not None:
            continue
        path = find_on_path(program, path=environ.get("PATH", os.defpath))
        if path is not None:  # not found: the service looks the same way (llama-server: .venv)
            found[name] = str(path)
    return found


def service_environment(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    return {**carried_environment(environ), **resolved_programs(settings, environ)}


def service_keys_file(settings: Settings, kind: str = "api") -> Path:
    return settings.state_dir / f"service-{kind}-keys"


def spec_for(settings: Settings, environ: Mapping[str, str] | None = None,
             checkout: Path = PROJECT_ROOT) -> ServiceSpec:
    """What the service runs, with the shell's settings. Keys exported in the shell never
    go into a unit, plist or crontab (readable by others): they go into a file only the user
    can read, which the service names in API_KEYS_FILE."""
    env = os.environ if environ is None else environ
    carried = service_environment(settings, env)
    for kind, keys in (("api", settings.api_keys), ("admin", settings.admin_keys)):
        name = f"{kind.upper()}_KEYS"
        if carried.pop(name, "").strip() and keys:
            from model_serve.internal_key import write_keys_file

            carried[f"{name}_FILE"] = str(write_keys_file(service_keys_file(settings, kind),
                                                          keys))
    spec = ServiceSpec(checkout=checkout, port=settings.port,
                       log_dir=settings.log_file.parent, environment=carried)
    values = {"the checkout path": str(checkout), "the log folder": str(spec.log_dir),
              **spec.environment}
    for what, value in values.items():
        if any(char in value for char in "\n\r\0"):
            raise ConfigError(f"{what} ({value!r}) contains a line break, which no service "
                              "file can carry", "use a path (or value) without line breaks")
    return spec


# --- names and places -----------------------------------------------------------------------------
def systemd_unit_name(port: int) -> str:
    return "model-serve.service" if port == DEFAULT_PORT else f"model-serve-{port}.service"


def launchd_label(port: int) -> str:
    return "com.model-serve.agent" if port == DEFAULT_PORT else f"com.model-serve.agent.{port}"


def cron_marker(port: int) -> str:
    """Trailing shell comment that identifies our crontab line (the bracket ends the port)."""
    return f"# model_serve keep-alive [port {port}]"


def service_name(kind: str, port: int) -> str:
    return {"systemd": systemd_unit_name, "launchd": launchd_label,
            "cron": cron_marker}[kind](port)


def file_path(kind: str, port: int, environ: Mapping[str, str] | None = None) -> Path:
    """Where the service manager looks for a per-user service file."""
    env = os.environ if environ is None else environ
    home = Path(env.get("HOME") or Path.home())
    if kind == "systemd":
        config = env.get("XDG_CONFIG_HOME", "")
        base = Path(config) if os.path.isabs(config) else home / ".config"
        return base / "systemd" / "user" / systemd_unit_name(port)
    if kind == "launchd":
        return home / "Library" / "LaunchAgents" / f"{launchd_label(port)}.plist"
    raise ValueError(f"{kind} has no file")


# --- renderers ------------------------------------------------------------------------------------
def _systemd_word(value: str, dollar: bool = False) -> str:
    """One quoted word for ExecStart=/Environment=: C escapes inside double quotes, and `%`
    doubled because systemd expands %-specifiers before it splits the line. Arguments after
    the executable also expand `$VAR`, so `dollar` doubles `$` there."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if dollar:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"'


_UNSAFE_IN_EXECUTABLE = frozenset("\"'\\\x7f" + "".join(map(chr, range(32))))


def _exec_start(program: str) -> str:
    """systemd refuses an executable path holding quotes, backslashes or control characters;
    such a path runs through /usr/bin/env as an ordinary (escaped) argument instead."""
    if _UNSAFE_IN_EXECUTABLE.intersection(program):
        return f"/usr/bin/env {_systemd_word(program, dollar=True)} serve"
    return f"{_systemd_word(program)} serve"


def systemd_unit(spec: ServiceSpec) -> str:
    lines = [
        f"# {MARKER}",
        "[Unit]",
        f"Description=model_serve: local GGUF models on port {spec.port}",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={_exec_start(str(spec.program))}",
        # WorkingDirectory= takes the rest of the line as it is, after %-specifiers.
        f"WorkingDirectory={str(spec.checkout).replace('%', '%%')}",
        *(f"Environment={_systemd_word(f'{key}={value}')}"
          for key, value in spec.environment.items()),
        "Restart=on-failure",
        f"RestartSec={RESTART_DELAY}",
        # TERM goes to the supervisor alone, which stops the engine and every model server in
        # order; whatever is left in the cgroup after the timeout gets KILL.
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_TIMEOUT}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def launchd_plist(spec: ServiceSpec) -> str:
    import plistlib

    log = str(spec.log_dir / "launchd.log")
    agent = {
        "Label": launchd_label(spec.port),
        "ProgramArguments": [str(spec.program), "serve"],
        "WorkingDirectory": str(spec.checkout),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart after a crash, not after `model stop`
        "ExitTimeOut": STOP_TIMEOUT,
        # Unspecified, launchd throttles an agent's CPU and I/O; inference must not be.
        "ProcessType": "Interactive",
        "StandardOutPath": log,
        "StandardErrorPath": log,
        "EnvironmentVariables": {"PATH": SERVICE_PATH, **spec.environment},
    }
    text = plistlib.dumps(agent, sort_keys=False).decode("utf-8")
    return text.replace("<plist ", f"<!-- {MARKER} -->\n<plist ", 1)


def cron_line(spec: ServiceSpec) -> str:
    """Hourly: start the stack when `model status` says it is down. cron runs the command with
    /bin/sh and a bare environment, and turns an unescaped `%` into a newline."""
    exports = " ".join(f"{key}={shlex.quote(value)}"
                       for key, value in {"PATH": SERVICE_PATH, **spec.environment}.items())
    model = shlex.quote(str(spec.program))
    command = f"export {exports}; {model} status >/dev/null 2>&1 || {model} start >/dev/null"
    escaped = command.replace("%", "\\%")
    return f"0 * * * * {escaped} {cron_marker(spec.port)}"


def render(kind: str, spec: ServiceSpec) -> str:
    return {"systemd": systemd_unit, "launchd": launchd_plist, "cron": cron_line}[kind](spec)


# --- our files only -------------------------------------------------------------------------------
def is_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return MARKER in handle.read(1000)
    except (OSError, UnicodeDecodeError):
        return False


def ownership(path: Path) -> str:
    """"ours", "absent" or "foreign" (a file of that name that we did not write)."""
    if not path.exists() and not path.is_symlink():
        return "absent"
    return "ours" if is_ours(path) else "foreign"


def _refuse_foreign(path: Path) -> None:
    if ownership(path) == "foreign":
        raise ModelServeError(f"{path} exists and was not written by model_serve",
                              "move it away (or remove it yourself), then run this again")


def write_service_file(kind: str, spec: ServiceSpec,
                       environ: Mapping[str, str] | None = None) -> tuple[Path, bool]:
    """Write the unit/plist (atomically, only when changed); return (path, changed)."""
    from model_serve.fileio import write_if_changed

    path = file_path(kind, spec.port, environ)
    _refuse_foreign(path)
    spec.log_dir.mkdir(parents=True, exist_ok=True)  # launchd does not create log folders
    return path, write_if_changed(path, render(kind, spec))


def remove_service_file(kind: str, port: int, environ: Mapping[str, str] | None = None) -> bool:
    """Remove our unit/plist; return False when there was none. A foreign file is refused."""
    path = file_path(kind, port, environ)
    if ownership(path) == "absent":
        return False
    _refuse_foreign(path)
    path.unlink()
    return True


def installed_service(port: int,
                      environ: Mapping[str, str] | None = None) -> tuple[str, Path] | None:
    """(kind, file) of the login service setup_service.sh installed for this port, if any."""
    kind = "launchd" if sys.platform == "darwin" else "systemd"
    path = file_path(kind, port, environ)
    return (kind, path) if ownership(path) == "ours" else None


def service_start_argv(kind: str, port: int) -> list[str]:
    """The service manager's own start, so the stack runs under it, not beside it."""
    if kind == "systemd":
        return ["systemctl", "--user", "start", systemd_unit_name(port)]
    return ["launchctl", "kickstart", f"gui/{os.getuid()}/{launchd_label(port)}"]


# --- command line for the setup scripts -----------------------------------------------------------
ACTIONS = {
    "name": (KINDS, "print the unit name, launchd label or crontab marker"),
    "path": (FILE_KINDS, "print where the unit/plist goes"),
    "check": (FILE_KINDS, "print ours, absent or foreign for that file"),
    "render": (KINDS, "print the unit, plist or crontab line"),
    "write": (FILE_KINDS, "write the unit/plist; print changed or unchanged"),
    "remove": (FILE_KINDS, "remove our unit/plist; print removed or absent"),
    "carried": ((), "print the settings taken from this environment (and the programs it "
                    "finds), space-separated"),
    "stop-timeout": ((), "print the seconds the service manager gives the stack's orderly stop "
                         "(ExitTimeOut, TimeoutStopSec)"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_serve.service.files",
                                     description="Service files for setup_service.sh and "
                                                 "setup_cron.sh.")
    actions = parser.add_subparsers(dest="action", required=True)
    for action, (kinds, help_text) in ACTIONS.items():
        sub = actions.add_parser(action, help=help_text)
        if kinds:
            sub.add_argument("kind", choices=kinds)
        if action == "render":
            sub.add_argument("--checkout", type=Path, default=PROJECT_ROOT,
                             help="render for this checkout instead of this one")
    return parser


def run(args: argparse.Namespace) -> str:
    from model_serve.config.settings import load_settings

    if args.action == "stop-timeout":
        return str(STOP_TIMEOUT)
    settings = load_settings()
    port = settings.port
    if args.action == "name":
        return service_name(args.kind, port)
    if args.action == "path":
        return str(file_path(args.kind, port))
    if args.action == "check":
        return ownership(file_path(args.kind, port))
    if args.action == "carried":
        return " ".join(service_environment(settings, os.environ))
    if args.action == "remove":
        return "removed" if remove_service_file(args.kind, port) else "absent"
    spec = spec_for(settings, checkout=getattr(args, "checkout", PROJECT_ROOT))
    if args.action == "render":
        return render(args.kind, spec).rstrip("\n")
    _path, changed = write_service_file(args.kind, spec)
    return "changed" if changed else "unchanged"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(run(args))
    except ModelServeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  fix: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
