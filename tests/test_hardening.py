"""Failures a careful reading found, each reproduced with real processes: an engine that fails
to start, a binary that vanishes, a SIGKILLed supervisor, a sync that hits an OSError, an API
open to the network without keys."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from model_serve.engines.llama_server import resolve_llama_server
from model_serve.runtime.procs import wait_until
from tests.conftest import Env, llama_servers_under, stack_processes_under

CRASHING = Path(__file__).resolve().parent / "crashing_llama_server"


def _engine_state(env: Env) -> dict:
    return json.loads(env.run("status", "--json").stdout)["children"]["engine"]


def _wrapped_binary(env: Env, tmp_path: Path) -> Path:
    """A llama-server of our own to take away: the crafted wrapper around the real one."""
    copy = tmp_path / "bin" / "llama-server"
    copy.parent.mkdir()
    shutil.copy2(CRASHING, copy)
    env["REAL_LLAMA_SERVER"] = str(resolve_llama_server(None))
    env["LLAMA_SERVER_BIN"] = str(copy)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return copy


def test_start_says_the_engine_failed_and_why(env: Env, tmp_path: Path) -> None:
    _wrapped_binary(env, tmp_path)
    env["ROUTER_EXIT"] = "3"
    started = env.run("start", timeout=150)
    assert started.returncode != 0
    assert "the engine failed to start: 5 failed starts in a row" in started.stderr
    assert "exited with code 3" in started.stderr
    assert "crafted router failure" in started.stderr  # the log's last lines come along
    assert "did not come up" not in started.stderr
    assert stack_processes_under(env.home.parent) == []


def test_a_vanished_engine_binary_does_not_kill_the_supervisor(env: Env, tmp_path: Path,
                                                               gemma_path: Path) -> None:
    binary = _wrapped_binary(env, tmp_path)
    (env.models / gemma_path.name).symlink_to(gemma_path)
    assert env.run("start").returncode == 0
    try:
        good = binary.read_bytes()
        binary.write_bytes(b"\x7fELF half-written by an upgrade")  # exec: "Exec format error"
        os.kill(_engine_state(env)["pid"][0], signal.SIGKILL)
        assert wait_until(lambda: "exited with code 127"
                          in _engine_state(env).get("last_error", ""), timeout=30)
        status = env.run("status")
        assert status.returncode == 0, status.stdout  # the supervisor lives on
        assert "Exec format error" in env.run("logs", "-n", "200").stdout
        binary.unlink()  # gone altogether
        assert wait_until(lambda: "not an executable file"
                          in _engine_state(env).get("last_error", ""), timeout=30)
        binary.write_bytes(good)
        binary.chmod(0o755)
        assert wait_until(lambda: _engine_state(env)["state"] == "running", timeout=60)
    finally:
        env.run("stop", timeout=60)
    assert stack_processes_under(env.home.parent) == []


def test_a_sigkilled_supervisor_takes_engine_model_servers_and_unloader_along(
        stack: Env) -> None:
    from openai import OpenAI

    OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0).completions.create(
        model="ls/gemma-3:270m-q4_k_m", prompt="Hi", max_tokens=2)
    state = json.loads((stack.state / "supervisor.json").read_text())
    supervisor = state["pid"][0]
    ours = [p for p in stack_processes_under(stack.home.parent) if p != supervisor]
    assert len(llama_servers_under(stack.home.parent)) >= 2  # router and the model's server
    os.kill(supervisor, signal.SIGKILL)
    began = time.monotonic()
    gone = wait_until(lambda: not [p for p in ours if psutil.pid_exists(p)
                                   and psutil.Process(p).status() != psutil.STATUS_ZOMBIE],
                      timeout=15)
    assert gone, f"still running {time.monotonic() - began:.0f}s after: {ours}"


def _guarded(watch: bool, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A parent process running `sleep` under the guard; returns the parent and a pid file."""
    pid_file = tmp_path / f"sleep-{watch}.pid"
    script = (
        "import subprocess, sys\n"
        "from model_serve.runtime.orphan_guard import guard_argv\n"
        f"argv = guard_argv(['sh', '-c', 'echo $$ > {pid_file}; exec sleep 600'], watch={watch})\n"
        "subprocess.Popen(argv, start_new_session=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
    assert wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=10)
    return parent, pid_file


def test_orphan_guard_both_ways(tmp_path: Path) -> None:
    """Linux's parent-death signal, and the watching parent macOS uses (tried here too)."""
    for watch in (False, True):
        parent, pid_file = _guarded(watch, tmp_path)
        sleeper = int(pid_file.read_text())
        assert psutil.pid_exists(sleeper)
        parent.kill()
        parent.wait()

        def ended(pid: int = sleeper) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        assert wait_until(ended, timeout=10), f"watch={watch}: the program outlived its parent"


def test_the_sync_loop_survives_an_os_error_and_says_so(stack: Env) -> None:
    stack.run("stop", timeout=60)
    stack["BRIDGE_SYNC_INTERVAL"] = "1"
    assert stack.run("start").returncode == 0
    config = stack.state / "models.ini"
    config.unlink()
    config.mkdir()  # the next write of the config fails with IsADirectoryError
    try:
        def sync() -> dict:
            return json.loads(stack.run("status", "--json").stdout)["children"]["sync"]

        assert wait_until(lambda: sync()["state"] == "backoff", timeout=20)
        assert "Is a directory" in sync()["last_error"]
        assert "Is a directory" in stack.run("status").stdout
        config.rmdir()
        assert wait_until(lambda: sync()["state"] == "running", timeout=30)
        assert config.is_file() and "[ls/gemma-3-270m-q4_k_m]" in config.read_text()
    finally:
        if config.is_dir():
            config.rmdir()


def test_doctor_warns_about_an_open_port_without_keys(env: Env) -> None:
    env["LISTEN_HOST"] = "0.0.0.0"
    checks = {c["name"]: c for c in json.loads(env.run("doctor", "--json").stdout)}
    assert checks["exposure"]["status"] == "warn"
    assert "API_KEYS" in checks["exposure"]["fix"]
    env["API_KEYS"] = "k1"
    checks = {c["name"]: c for c in json.loads(env.run("doctor", "--json").stdout)}
    assert checks["exposure"]["status"] == "ok"


def test_a_config_the_engine_refuses_is_not_left_on_disk(stack: Env) -> None:
    """`--min-hits` shows up in llama-server's --help text, but the router's preset parser
    does not know it: the router answers the reload with HTTP 500 and keeps its old config."""
    config = stack.state / "models.ini"
    good = config.read_text()
    (stack.home / "custom_models.yaml").write_text(
        "models:\n  gemma-3:270m-q4_k_m:\n    sampler_args: '--min-hits 2'\n")
    synced = stack.run("sync")
    assert synced.returncode == 1
    assert "min-hits" in synced.stderr and "the last good models.ini was put back" in synced.stderr
    assert config.read_text() == good
    # A restart (crash, reboot) starts the engine on the config it last ran with, and says so.
    stack.run("stop", timeout=60)
    started = stack.run("start")
    assert started.returncode == 0, started.stderr
    assert "the last good one was put back" in started.stderr
    assert config.read_text() == good
    assert "the last good one was put back" in stack.run("status").stdout


def test_logs_follow_goes_on_after_the_log_rotates(env: Env) -> None:
    """Rotation as the stack's log handler does it: the file is renamed to .1, a new one made."""
    log = env.state / "logs" / "model_serve.log"
    log.parent.mkdir(parents=True)
    log.write_text("before\n")
    follower = subprocess.Popen([sys.executable, "-m", "model_serve", "logs", "-f"],
                                env=dict(env), cwd=env.home, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert follower.stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout],
                     daemon=True).start()

    def next_line() -> str:
        try:
            return lines.get(timeout=10)
        except queue.Empty:
            return "(nothing within 10 s)"

    try:
        assert next_line() == "before\n"
        time.sleep(0.5)
        with open(log, "a") as handle:
            handle.write("last line of the old file\n")
        log.rename(log.with_name("model_serve.log.1"))
        log.write_text("first line of the new file\n")
        seen = [next_line(), next_line()]
        assert seen == ["last line of the old file\n", "first line of the new file\n"]
        with open(log, "a") as handle:
            handle.write("and the next\n")
        assert next_line() == "and the next\n"
    finally:
        follower.kill()
        follower.wait()


def test_model_run_says_what_went_wrong_and_keeps_the_conversation(stack: Env,
                                                                   gemma_path: Path) -> None:
    import pexpect

    (stack.home / "custom_models.yaml").write_text(
        "models:\n  gemma-3:270m-q4_k_m:\n    sampler_args: '--n-predict 8'\n")
    assert stack.run("sync").returncode == 0
    chat = pexpect.spawn(sys.executable, ["-m", "model_serve", "run", "ls/gemma-3:270m-q4_k_m"],
                         env=dict(stack), cwd=str(stack.home), encoding="utf-8", timeout=120)
    try:
        chat.expect(">>> ")
        chat.sendline("Hello")
        chat.expect(">>> ")
        link = stack.models / "google" / gemma_path.name
        link.rename(link.with_suffix(".off"))  # the model goes away while we chat
        assert stack.run("sync").returncode == 0
        chat.sendline("Still there?")
        chat.expect("error: the server answered HTTP 4\\d\\d: ")
        chat.expect(">>> ")  # the conversation goes on
        link.with_suffix(".off").rename(link)
        assert stack.run("sync").returncode == 0
        assert stack.run("stop").returncode == 0
        chat.sendline("And now?")
        chat.expect("error: the stack at .* is not answering")
        chat.expect(">>> ")
        assert stack.run("start").returncode == 0
        chat.sendline("Back?")
        chat.expect(">>> ")
        assert "error" not in chat.before and "Traceback" not in chat.before
        chat.sendline("/exit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0


def test_a_keys_file_others_may_read_is_warned_of_by_name(env: Env) -> None:
    """API_KEYS_FILE readable by other users: accepted (refusing would stop existing
    installs), but `model doctor` warns, naming the file and the chmod."""
    keys = env.home / "api-keys"
    keys.write_text("k1\n")
    keys.chmod(0o644)
    env["API_KEYS_FILE"] = str(keys)
    checks = {c["name"]: c for c in json.loads(env.run("doctor", "--json").stdout)}
    warned = [c for c in checks.values() if str(keys) in c["detail"]]
    assert [(c["status"], c["fix"]) for c in warned] == [("warn", f"chmod 600 {keys}")]
    assert "other users" in warned[0]["detail"]
    keys.chmod(0o600)
    checks = {c["name"]: c for c in json.loads(env.run("doctor", "--json").stdout)}
    assert not any(str(keys) in c["detail"] and c["status"] == "warn" for c in checks.values())
