"""setup_service.sh and setup_cron.sh: the rendered unit/plist/crontab line, and the scripts run
for real against stand-ins of the system tools (systemctl, launchctl, loginctl, crontab, uname)
in a temp HOME. The stack itself is never a stand-in: where a script starts or stops it, a real
stack runs on a free port in the test's own MODEL_SERVE_HOME."""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from model_serve.config.settings import load_settings
from model_serve.errors import ConfigError
from model_serve.service import files as service_files
from model_serve.service.files import ServiceSpec
from tests.conftest import REPO, Env, llama_servers_under

FAKE_CHECKOUT = Path("/opt/my models/model_serve")


def fake_spec(checkout: Path = FAKE_CHECKOUT, port: int = 5847, **environment: str) -> ServiceSpec:
    return ServiceSpec(checkout=checkout, port=port, log_dir=Path("/srv/ms home/state/logs"),
                       environment=environment)


# --- stand-ins for system tools -------------------------------------------------------------------
def tool(bin_dir: Path, name: str, body: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n", encoding="utf-8")
    path.chmod(0o755)
    return path


def recording_tool(bin_dir: Path, name: str, calls: Path, then: str = "exit 0") -> Path:
    """A stand-in that appends its arguments (one call a line) to `calls`, then runs `then`."""
    return tool(bin_dir, name, f'printf "%s\\n" "$*" >> {shlex.quote(str(calls))}\n{then}')


def path_without(tmp: Path, *missing: str) -> str:
    """A PATH holding every program of the current PATH except `missing`."""
    bin_dir = tmp / "bin-without"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = bin_dir / entry.name
            if entry.name in missing or target.exists() or not os.access(entry.path, os.X_OK):
                continue
            target.symlink_to(entry.path)
    return str(bin_dir)


def calls_of(calls: Path) -> list[str]:
    return calls.read_text(encoding="utf-8").splitlines() if calls.exists() else []


class Service:
    """One temp HOME whose PATH starts with stand-in system tools."""

    def __init__(self, env: Env, tmp: Path, system: str) -> None:
        self.env = env
        self.user_home = tmp / "user"
        self.user_home.mkdir()
        self.bin = tmp / "standins"
        self.calls = tmp / "calls.txt"
        tool(self.bin, "uname", f'echo {system}')
        env["HOME"] = str(self.user_home)
        env["PATH"] = f"{self.bin}{os.pathsep}{env['PATH']}"
        env.pop("XDG_CONFIG_HOME", None)

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(REPO / script), *args], env=dict(self.env), text=True,
                              capture_output=True, timeout=180, cwd=self.env.home)

    @property
    def calls_made(self) -> list[str]:
        return calls_of(self.calls)


@pytest.fixture
def linux(env: Env, tmp_path: Path) -> Service:
    service = Service(env, tmp_path, "Linux")
    # is-active says "inactive", like a unit that does not run yet.
    recording_tool(service.bin, "systemctl", service.calls,
                   'case "$*" in *is-active*) exit 3 ;; esac; exit 0')
    recording_tool(service.bin, "loginctl", service.calls)
    return service


def launchctl_standin(service: Service, linger: int = 3, failures: int = 0,
                      long_print: bool = False) -> Path:
    """launchctl as launchd behaves: `bootout` returns at once, but `print` still finds the
    service for `linger` more calls, and a `bootstrap` until then fails with launchd's
    "5: Input/output error"; the first `failures` bootstraps fail that way regardless.
    `long_print`: `print` goes on writing after its state line (as launchctl does, at length)."""
    state = service.bin.parent / "launchd-state"
    state.mkdir(exist_ok=True)
    (state / "failures").write_text(str(failures))
    (state / "rest").write_text("\tendpoints = {}\n" * (200_000 if long_print else 1))
    st = shlex.quote(str(state))
    return recording_tool(service.bin, "launchctl", service.calls, f"""
case "$1" in
  print)
    [ -f {st}/loaded ] || {{ echo "Could not find service" >&2; exit 113; }}
    if [ -f {st}/leaving ]; then
      left=$(cat {st}/leaving)
      if [ "$left" -le 0 ]; then rm -f {st}/loaded {st}/leaving; exit 113; fi
      echo $((left - 1)) > {st}/leaving
    fi
    printf '\tstate = running\n\tpid = 4242\n'
    exec cat {st}/rest ;;
  bootout) [ -f {st}/loaded ] && echo {linger} > {st}/leaving ;;
  bootstrap)
    failures=$(cat {st}/failures)
    if [ -f {st}/loaded ] || [ "$failures" -gt 0 ]; then
      echo $((failures - 1)) > {st}/failures
      echo "Bootstrap failed: 5: Input/output error" >&2; exit 5
    fi
    touch {st}/loaded ;;
esac
exit 0""")


@pytest.fixture
def macos(env: Env, tmp_path: Path) -> Service:
    service = Service(env, tmp_path, "Darwin")
    launchctl_standin(service)
    return service


# --- rendered files -------------------------------------------------------------------------------
def test_systemd_unit_quotes_a_checkout_path_with_a_space() -> None:
    unit = service_files.systemd_unit(fake_spec(MODEL_SERVE_HOME="/srv/ms home"))
    lines = unit.splitlines()
    assert lines[0] == f"# {service_files.MARKER}"
    for expected in ('ExecStart="/opt/my models/model_serve/model" serve',
                     "WorkingDirectory=/opt/my models/model_serve",
                     'Environment="MODEL_SERVE_HOME=/srv/ms home"',
                     "Restart=on-failure", "RestartSec=5", "KillMode=mixed",
                     "TimeoutStopSec=45", "WantedBy=default.target"):
        assert expected in lines, expected
    assert lines.index("[Service]") < lines.index("KillMode=mixed") < lines.index("[Install]")


def test_systemd_unit_escapes_what_systemd_would_expand() -> None:
    unit = service_files.systemd_unit(
        fake_spec(Path("/opt/50% $HOME"), MODELS_DIR='/m/"q" 100%', API_KEYS="a$b"))
    assert 'ExecStart="/opt/50%% $HOME/model" serve' in unit  # the executable is not expanded
    assert "WorkingDirectory=/opt/50%% $HOME\n" in unit
    assert 'Environment="MODELS_DIR=/m/\\"q\\" 100%%"' in unit
    assert 'Environment="API_KEYS=a$b"' in unit
    # systemd refuses quotes and backslashes in an executable path: /usr/bin/env runs it then.
    unit = service_files.systemd_unit(fake_spec(Path("/home/bob's $X\\y")))
    assert 'ExecStart=/usr/bin/env "/home/bob\'s $$X\\\\y/model" serve' in unit


def _checkout_with_model(root: Path, name: str) -> Path:
    checkout = root / name
    checkout.mkdir(parents=True)
    tool(checkout, "model", "exit 0")
    return checkout


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """systemd's own parser reads each unit back: a wrong escape shows up as a bad setting, or as
    an executable that does not exist at the path systemd understood."""
    names = ["plain", "with space", "50% $HOME", "bob's \"quoted\" back\\slash"]
    units = {}
    for name in names:
        checkout = _checkout_with_model(tmp_path / "checkouts", name)
        unit_file = tmp_path / "units" / name.replace("/", "_") / "model-serve.service"
        unit_file.parent.mkdir(parents=True)
        unit_file.write_text(service_files.systemd_unit(
            fake_spec(checkout, MODEL_SERVE_HOME=str(checkout), MODELS_DIR="/a b/100%")))
        units[name] = (checkout, unit_file)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # no systemd here: the parts systemd would read, checked by hand
        assert 'ExecStart="' + str(units["with space"][0]) + '/model" serve' in (
            units["with space"][1].read_text())
        assert "/usr/bin/env" in units["bob's \"quoted\" back\\slash"][1].read_text()
        return
    for name, (_checkout, unit_file) in units.items():
        result = subprocess.run([analyze, "verify", str(unit_file)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
    # A checkout that does not exist: systemd names the exact path it parsed from ExecStart.
    missing = tmp_path / "gone 50% $HOME"
    unit_file = tmp_path / "units" / "missing" / "model-serve.service"
    unit_file.parent.mkdir(parents=True)
    unit_file.write_text(service_files.systemd_unit(fake_spec(missing)))
    result = subprocess.run([analyze, "verify", str(unit_file)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert f"Command {missing}/model is not executable" in result.stdout + result.stderr


def test_launchd_plist_round_trips() -> None:
    checkout = Path("/Users/a b/<&> \"x\"/model_serve")
    spec = fake_spec(checkout, port=5900, MODEL_SERVE_HOME="/Users/a b/ms & co")
    text = service_files.launchd_plist(spec)
    assert service_files.MARKER in text
    agent = plistlib.loads(text.encode("utf-8"))
    assert agent["Label"] == "com.model-serve.agent.5900"
    assert agent["ProgramArguments"] == [f"{checkout}/model", "serve"]
    assert agent["WorkingDirectory"] == str(checkout)
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["StandardOutPath"] == agent["StandardErrorPath"] == (
        "/srv/ms home/state/logs/launchd.log")
    environment = agent["EnvironmentVariables"]
    assert environment["MODEL_SERVE_HOME"] == "/Users/a b/ms & co"
    assert environment["PATH"].split(":")[:2] == ["/opt/homebrew/bin", "/usr/local/bin"]


def test_names_carry_the_port_unless_it_is_the_default() -> None:
    assert service_files.systemd_unit_name(5847) == "model-serve.service"
    assert service_files.systemd_unit_name(5900) == "model-serve-5900.service"
    assert service_files.launchd_label(5847) == "com.model-serve.agent"
    assert service_files.launchd_label(5900) == "com.model-serve.agent.5900"
    assert service_files.cron_marker(5900) != service_files.cron_marker(59001)
    home = {"HOME": "/h", "XDG_CONFIG_HOME": ""}
    assert service_files.file_path("systemd", 5847, home) == Path(
        "/h/.config/systemd/user/model-serve.service")
    assert service_files.file_path("launchd", 5900, home) == Path(
        "/h/Library/LaunchAgents/com.model-serve.agent.5900.plist")


def test_cron_line_survives_cron_and_sh() -> None:
    checkout = Path("/opt/50% it's here")
    line = service_files.cron_line(fake_spec(checkout, port=5900, MODELS_DIR="/m/100% $x"))
    assert line.startswith("0 * * * * ")
    assert line.endswith(service_files.cron_marker(5900))
    command = line.split(None, 5)[5]
    assert "%" not in command.replace("\\%", "")  # cron would turn a bare % into a newline
    lexer = shlex.shlex(command.replace("\\%", "%"), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)  # the words /bin/sh sees, with ; || > as words of their own
    assert f"{checkout}/model" in words
    assert "MODELS_DIR=/m/100% $x" in words
    assert words[words.index(f"{checkout}/model") + 1] == "status"
    assert words[-5:] == ["||", f"{checkout}/model", "start", ">", "/dev/null"]


def test_service_gets_the_settings_of_the_calling_shell(env: Env) -> None:
    spec = service_files.spec_for(load_settings(dict(env)), dict(env))
    assert spec.port == env.port
    assert spec.environment["MODEL_SERVE_HOME"] == str(env.home)
    assert spec.environment["LLAMA_SWAP_PORT"] == str(env.port)
    assert spec.environment["MODELS_DIR"] == str(env.models)
    assert spec.log_dir == env.home / "state" / "logs"
    env["MODELS_DIR"] = f"{env.models}\nExecStartPre=/bin/false"
    with pytest.raises(ConfigError, match="line break"):
        service_files.spec_for(load_settings(dict(env)), dict(env))


def test_service_runs_the_programs_this_shell_finds(env: Env, tmp_path: Path) -> None:
    shell_bin = tmp_path / "my-bin"  # e.g. ~/bin or MacPorts' /opt/local/bin
    swap = tool(shell_bin, "llama-swap", "exit 0")
    ollama = tool(shell_bin, "ollama", "exit 0")
    env["PATH"] = f"{shell_bin}{os.pathsep}{env['PATH']}"
    spec = service_files.spec_for(load_settings(dict(env)), dict(env))
    assert spec.environment["LLAMA_SWAP_BIN"] == str(swap)
    assert spec.environment["OLLAMA_BIN"] == str(ollama)
    plist = plistlib.loads(service_files.launchd_plist(spec).encode())
    assert plist["EnvironmentVariables"]["LLAMA_SWAP_BIN"] == str(swap)
    # Set in .env, a program is the service's to read from there: nothing is recorded.
    (env.home / ".env").write_text(f"OLLAMA_BIN={ollama}\n")
    spec = service_files.spec_for(load_settings(dict(env)), dict(env))
    assert "OLLAMA_BIN" not in spec.environment and "LLAMA_SWAP_BIN" in spec.environment


# --- setup_service.sh on Linux --------------------------------------------------------------------
def test_systemd_install_and_uninstall(linux: Service, env: Env) -> None:
    unit_dir = linux.user_home / ".config" / "systemd" / "user"
    unit_dir.mkdir(parents=True)
    other = unit_dir / "other.service"
    other.write_text("[Service]\nExecStart=/bin/true\n")
    name = f"model-serve-{env.port}.service"
    unit = unit_dir / name

    result = linux.run("setup_service.sh", "install")
    assert result.returncode == 0, result.stdout + result.stderr
    text = unit.read_text()
    assert f'ExecStart="{REPO}/model" serve' in text
    assert f'Environment="MODEL_SERVE_HOME={env.home}"' in text
    assert f'Environment="LLAMA_SWAP_PORT={env.port}"' in text
    calls = linux.calls_made
    assert "--user daemon-reload" in calls
    assert f"--user enable --now {name}" in calls
    assert calls.index("--user daemon-reload") < calls.index(f"--user enable --now {name}")
    assert any(call.startswith("enable-linger ") for call in calls)
    assert (env.home / "state" / "logs").is_dir()

    again = linux.run("setup_service.sh", "install")  # idempotent
    assert again.returncode == 0, again.stderr
    assert "(unchanged)" in again.stdout
    assert unit.read_text() == text
    assert not any("restart" in call for call in linux.calls_made)

    for command in ("start", "stop"):
        result = linux.run("setup_service.sh", command)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"--user {command} {name}" in linux.calls_made

    status = linux.run("setup_service.sh", "status")
    assert status.returncode == 3  # the stand-in started nothing
    assert f"--user status --no-pager {name}" in linux.calls_made

    removed = linux.run("setup_service.sh", "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert f"--user disable --now {name}" in linux.calls_made
    assert not unit.exists()
    assert other.read_text() == "[Service]\nExecStart=/bin/true\n"
    assert sorted(p.name for p in unit_dir.iterdir()) == ["other.service"]

    twice = linux.run("setup_service.sh", "uninstall")
    assert twice.returncode == 0 and "not installed" in twice.stdout


def test_systemd_refuses_a_unit_it_did_not_write(linux: Service, env: Env) -> None:
    unit = linux.user_home / ".config" / "systemd" / "user" / f"model-serve-{env.port}.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/usr/bin/someone-elses\n")
    for command in ("install", "uninstall"):
        result = linux.run("setup_service.sh", command)
        assert result.returncode == 1, result.stdout
        assert "was not written by model_serve" in result.stderr
    assert unit.read_text() == "[Service]\nExecStart=/usr/bin/someone-elses\n"
    assert not any("enable" in call or "disable" in call for call in linux.calls_made)


def test_install_stops_a_stack_that_model_start_runs(linux: Service, env: Env) -> None:
    started = env.run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        result = linux.run("setup_service.sh", "install")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "stopping the stack that './model start' runs" in result.stdout
        assert env.run("status").returncode == 3
        assert llama_servers_under(env.home.parent) == []
    finally:
        env.run("stop", timeout=60)


def test_unreachable_systemd_user_manager(env: Env, tmp_path: Path) -> None:
    service = Service(env, tmp_path, "Linux")
    tool(service.bin, "systemctl",
         'echo "Failed to connect to bus: No medium found" >&2; exit 1')
    result = service.run("setup_service.sh", "install")
    assert result.returncode == 1
    assert "user manager is not reachable" in result.stderr
    assert "Failed to connect to bus" in result.stderr
    assert "setup_cron.sh start" in result.stderr
    assert not (service.user_home / ".config").exists()


@pytest.mark.parametrize(("system", "missing"), [("Linux", "systemctl"), ("Darwin", "launchctl")])
def test_missing_service_manager(env: Env, tmp_path: Path, system: str, missing: str) -> None:
    service = Service(env, tmp_path, system)
    env["PATH"] = f"{service.bin}{os.pathsep}{path_without(tmp_path, 'systemctl', 'launchctl')}"
    result = service.run("setup_service.sh", "install")
    assert result.returncode == 1, result.stdout
    assert f"{missing} was not found" in result.stderr
    assert "setup_cron.sh start" in result.stderr
    assert result.stderr.count("\n") == 2  # one message, one fix


def test_usage(env: Env, tmp_path: Path) -> None:
    service = Service(env, tmp_path, "Linux")
    for args in ((), ("bogus",), ("install", "extra")):
        result = service.run("setup_service.sh", *args)
        assert result.returncode == 2, args
        assert "Usage: ./setup_service.sh install|uninstall|start|stop|status" in result.stderr
    assert service.run("setup_service.sh", "--help").returncode == 0
    result = service.run("setup_cron.sh", "bogus")
    assert result.returncode == 2 and "Usage: ./setup_cron.sh" in result.stderr


# --- setup_service.sh on macOS --------------------------------------------------------------------
def test_launchd_install_and_uninstall(macos: Service, env: Env) -> None:
    agents = macos.user_home / "Library" / "LaunchAgents"
    agents.mkdir(parents=True)
    other = agents / "com.example.other.plist"
    other.write_bytes(plistlib.dumps({"Label": "com.example.other"}))
    label = f"com.model-serve.agent.{env.port}"
    plist = agents / f"{label}.plist"
    domain = f"gui/{os.getuid()}"

    result = macos.run("setup_service.sh", "install")
    assert result.returncode == 0, result.stdout + result.stderr
    agent = plistlib.loads(plist.read_bytes())
    assert agent["Label"] == label
    assert agent["ProgramArguments"] == [f"{REPO}/model", "serve"]
    assert agent["EnvironmentVariables"]["MODEL_SERVE_HOME"] == str(env.home)
    assert Path(agent["StandardOutPath"]).parent.is_dir()  # launchd would not create it
    assert f"bootstrap {domain} {plist}" in macos.calls_made
    assert macos.run("setup_service.sh", "install").stdout.count("(unchanged)") == 1
    stopped = macos.run("setup_service.sh", "stop")  # the stack's own orderly stop
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr

    removed = macos.run("setup_service.sh", "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert f"bootout {domain}/{label}" in macos.calls_made
    assert not plist.exists()
    assert plistlib.loads(other.read_bytes()) == {"Label": "com.example.other"}


def test_launchd_reinstall_waits_for_the_old_agent_to_go(macos: Service, env: Env) -> None:
    label = f"com.model-serve.agent.{env.port}"
    domain = f"gui/{os.getuid()}"
    assert macos.run("setup_service.sh", "install").returncode == 0
    env["MODEL_TTL"] = "600"  # a changed setting: the agent must run the new plist
    before = len(macos.calls_made)
    result = macos.run("setup_service.sh", "install")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(changed)" in result.stdout and "Input/output error" not in result.stderr
    calls = macos.calls_made[before:]
    bootout = calls.index(f"bootout {domain}/{label}")
    bootstrap = calls.index(f"bootstrap {domain} {macos.user_home}/Library/LaunchAgents/"
                            f"{label}.plist")
    between = calls[bootout + 1:bootstrap]
    # launchd still knew the service 3 times after bootout; the 4th print found it gone.
    assert between.count(f"print {domain}/{label}") == 4
    assert between[-1] == f"enable {domain}/{label}"


def test_launchd_reinstall_waits_as_long_as_the_agents_exit_timeout(env: Env,
                                                                    tmp_path: Path) -> None:
    """The old agent's orderly stop (saving conversations) may take the plist's ExitTimeOut:
    launchd lets go of it 44 s after bootout here. `sleep` is a stand-in that returns at once
    and records what it was asked, so the test checks the wait without taking it."""
    service = Service(env, tmp_path, "Darwin")
    launchctl_standin(service, linger=220)  # 220 prints, 0.2 s apart: 44 s
    sleeps = tmp_path / "sleeps.txt"
    recording_tool(service.bin, "sleep", sleeps)
    assert service.run("setup_service.sh", "install").returncode == 0
    env["MODEL_TTL"] = "600"  # a changed setting: the agent must run the new plist
    result = service.run("setup_service.sh", "install")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Input/output error" not in result.stderr and "still loaded" not in result.stdout
    agent = plistlib.loads(service_files.file_path("launchd", env.port, env).read_bytes())
    assert f"up to {agent['ExitTimeOut'] + 5} s" in result.stdout
    waited = sum(float(line) for line in calls_of(sleeps))
    assert waited == pytest.approx(219 * 0.2), "a step between each two of the 220 prints"
    assert service.calls_made[-1].startswith("bootstrap "), "loaded once the old one went"


def test_a_long_launchctl_print_still_reads_as_running(env: Env, tmp_path: Path) -> None:
    service = Service(env, tmp_path, "Darwin")
    launchctl_standin(service, long_print=True)
    assert service.run("setup_service.sh", "install").returncode == 0
    again = service.run("setup_service.sh", "install")
    assert again.returncode == 0 and "(unchanged)" in again.stdout, again.stderr
    # Read as stopped (grep -q's early exit: SIGPIPE under pipefail), it would be kicked.
    assert not [call for call in service.calls_made if call.startswith("kickstart")]


@pytest.mark.parametrize("failures", [1, 2])
def test_launchd_bootstrap_errors_are_shown_and_retried_once(env: Env, tmp_path: Path,
                                                            failures: int) -> None:
    service = Service(env, tmp_path, "Darwin")
    launchctl_standin(service, failures=failures)
    result = service.run("setup_service.sh", "install")
    output = result.stdout + result.stderr
    assert "Bootstrap failed: 5: Input/output error" in output
    assert sum(call.startswith("bootstrap ") for call in service.calls_made) == 2
    if failures == 1:
        assert result.returncode == 0, output
    else:
        assert result.returncode != 0 and "could not load" in result.stderr
        assert list((service.user_home / "Library" / "LaunchAgents").glob("*.plist"))


# --- setup_cron.sh --------------------------------------------------------------------------------
def crontab_standin(bin_dir: Path, table: Path) -> None:
    """Keeps the table in a file: -l prints it, - or FILE replaces it, -r removes it."""
    quoted = shlex.quote(str(table))
    tool(bin_dir, "crontab", f"""case "$1" in
  -l) [ -f {quoted} ] || {{ echo "no crontab for $(id -un)" >&2; exit 1; }}; cat {quoted} ;;
  -r) rm -f {quoted} ;;
  -) cat > {quoted} ;;
  *) cat "$1" > {quoted} ;;
esac""")


def run_like_cron(line: str, home: Path) -> subprocess.CompletedProcess[str]:
    """What cron does with a line: unescape %, run the rest with /bin/sh in a bare environment."""
    command = line.split(None, 5)[5].replace("\\%", "%")
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=180,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/sh"})


def test_cron_keep_alive(env: Env, tmp_path: Path) -> None:
    service = Service(env, tmp_path, "Linux")
    table = tmp_path / "crontab.txt"
    crontab_standin(service.bin, table)
    others = ("# my own jobs\n"
              "MAILTO=me@example.com\n"
              "*/5 * * * * backup --quiet 50% # model_serve keep-alive [port 1]\n"
              "\n")
    table.write_text(others)
    marker = service_files.cron_marker(env.port)
    try:
        bare = service.run("setup_cron.sh")
        assert bare.returncode == 3 and "cron keep-alive: not installed" in bare.stdout

        started = service.run("setup_cron.sh", "start")
        assert started.returncode == 0, started.stdout + started.stderr
        text = table.read_text()
        assert text.startswith(others)
        ours = text[len(others):].splitlines()
        assert len(ours) == 1 and ours[0].endswith(marker)
        assert env.run("status").returncode == 0

        again = service.run("setup_cron.sh", "start")
        assert again.returncode == 0, again.stderr
        assert "already in your crontab" in again.stdout
        assert table.read_text() == text

        bare = service.run("setup_cron.sh")
        assert bare.returncode == 0 and "cron keep-alive: installed" in bare.stdout

        # The line itself, run as cron would, brings a stopped stack back.
        assert env.run("stop").returncode == 0
        assert env.run("status").returncode == 3
        kept = run_like_cron(ours[0], service.user_home)
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert env.run("status").returncode == 0
        assert run_like_cron(ours[0], service.user_home).returncode == 0  # running: no-op

        stopped = service.run("setup_cron.sh", "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert table.read_text() == others
        assert env.run("status").returncode == 3
        assert llama_servers_under(env.home.parent) == []
    finally:
        env.run("stop", timeout=60)


def test_cron_leaves_an_unreadable_table_alone(env: Env, tmp_path: Path) -> None:
    service = Service(env, tmp_path, "Linux")
    tool(service.bin, "crontab", 'echo "You (me) are not allowed to use this program" >&2; exit 1')
    result = service.run("setup_cron.sh", "start")
    assert result.returncode == 1
    assert "crontab -l failed: You (me) are not allowed" in result.stderr
    assert env.run("status").returncode == 3


def test_cron_without_crontab(env: Env, tmp_path: Path) -> None:
    service = Service(env, tmp_path, "Linux")
    env["PATH"] = f"{service.bin}{os.pathsep}{path_without(tmp_path, 'crontab')}"
    result = service.run("setup_cron.sh", "start")
    assert result.returncode == 1
    assert "crontab was not found" in result.stderr
    assert "apt-get install cron" in result.stderr


@pytest.mark.parametrize("kind", ["API", "ADMIN"])
def test_keys_never_go_into_a_service_file(env: Env, kind: str) -> None:
    env[f"{kind}_KEYS"] = "sk-secret-1,sk-secret-2"
    settings = load_settings(dict(env))
    spec = service_files.spec_for(settings, dict(env))
    for service in ("systemd", "launchd", "cron"):
        assert "sk-secret" not in service_files.render(service, spec)
    keys_file = Path(spec.environment[f"{kind}_KEYS_FILE"])
    assert keys_file.read_text() == "sk-secret-1\nsk-secret-2\n"
    assert keys_file.stat().st_mode & 0o777 == 0o600
    # The service, started with what the unit carries, has the keys.
    service_env = {k: v for k, v in env.items() if k != f"{kind}_KEYS"} | spec.environment
    loaded = load_settings(service_env)
    assert (loaded.api_keys if kind == "API" else loaded.admin_keys) == ("sk-secret-1",
                                                                          "sk-secret-2")
    keys_file.write_text("")
    with pytest.raises(ConfigError, match="holds no key"):
        load_settings(service_env)


def test_model_start_goes_through_an_installed_service(linux: Service, env: Env,
                                                       gemma_path: Path) -> None:
    """With the unit installed, `model start` asks systemd, so the stack runs under it and no
    second copy fights the service for the port. This systemctl stand-in starts the unit's
    command as systemd would."""
    import sys

    tool(linux.bin, "systemctl", f'printf "%s\\n" "$*" >> {shlex.quote(str(linux.calls))}\n'
         'case "$*" in\n'
         '  *is-active*) exit 3 ;;\n'
         f'  "--user start "*) {shlex.quote(sys.executable)} -m model_serve serve '
         '>/dev/null 2>&1 </dev/null & exit 0 ;;\n'
         'esac\nexit 0')
    (env.models / gemma_path.name).symlink_to(gemma_path)
    assert linux.run("setup_service.sh", "install").returncode == 0
    name = f"model-serve-{env.port}.service"
    try:
        started = env.run("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "under its login service" in started.stdout and name in started.stdout
        assert f"--user start {name}" in linux.calls_made
        assert env.run("status").returncode == 0
    finally:
        env.run("stop", timeout=60)
    assert llama_servers_under(env.home.parent) == []

