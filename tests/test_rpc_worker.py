"""`model worker`: real ggml-rpc-server processes (the build install.sh made), on real ports of
127.0.0.1, each under a supervisor of its own: two on one machine, restarted when killed,
none left after a stop or after their supervisor is killed, and bad input refused clearly."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from model_serve.runtime.procs import wait_until
from tests.conftest import Env, free_port, stack_processes_under


@pytest.fixture
def env(env: Env) -> Iterator[Env]:
    """The shared fixture's home; whatever a failed test left running there is ended."""
    yield env
    env.run("worker", "stop")
    for pid in stack_processes_under(env.home):
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def workers(env: Env) -> dict[int, dict]:
    result = env.run("worker", "status", "--json")
    return {w["port"]: w for w in json.loads(result.stdout)}


def start(env: Env, port: int, *args: str) -> dict:
    result = env.run("worker", "start", "--port", str(port), *args, "--json", check=True)
    assert "no authentication" in result.stderr, result.stderr  # the warning, at every start
    assert "other machines can reach" not in result.stderr  # louder only off loopback
    return json.loads(result.stdout)[0]


def test_two_workers_restart_when_killed_and_stop(env: Env) -> None:
    first, second = free_port(), free_port()
    one = start(env, first, "--threads", "1")
    assert one["listening"] and one["options"] == ["--threads", "1"]
    assert one["address"] == f"127.0.0.1:{first}"  # loopback unless told otherwise
    start(env, second)
    both = workers(env)
    assert sorted(both) == sorted([first, second])
    for worker in both.values():
        assert worker["running"] and worker["listening"], worker
        # What the server reported of itself: its devices and their memory.
        assert worker["devices"] and worker["devices"][0]["name"] == "CPU", worker
        assert worker["devices"][0]["free_bytes"] > 0
        assert Path(worker["log_file"]).stat().st_mode & 0o077 == 0  # the owner's only
    text = env.run("worker", "status").stdout
    assert f"worker 127.0.0.1:{first}: listening" in text and "CPU:" in text, text

    # Its server killed: the supervisor starts it again, and says why.
    os.kill(one["pid"], signal.SIGKILL)
    assert wait_until(lambda: workers(env)[first]["restarts"] == 1
                      and workers(env)[first]["listening"], 30, interval=0.2)
    again = workers(env)[first]
    assert again["pid"] != one["pid"] and "code -9" in again["last_exit"], again

    # One stopped, the other left running; then every one.
    assert "stopped the worker on" in env.run("worker", "stop", "--port", str(first),
                                              check=True).stdout
    assert sorted(workers(env)) == [second]
    env.run("worker", "stop", check=True)
    assert env.run("worker", "status").returncode == 3
    assert wait_until(lambda: not stack_processes_under(env.home), 10)


def test_a_killed_supervisor_leaves_no_worker(env: Env) -> None:
    """Its server ends with it (the orphan guard), and the port can be taken again."""
    port = free_port()
    worker = start(env, port)
    server = psutil.Process(worker["pid"])
    os.kill(worker["supervisor_pid"], signal.SIGKILL)
    assert wait_until(lambda: not server.is_running() or server.status() == "zombie", 20)
    status = env.run("worker", "status")
    assert status.returncode == 3 and f"worker 127.0.0.1:{port}: stopped" in status.stdout \
        and f"'model worker stop --port {port}' forgets it" in status.stdout, status.stdout
    start(env, port)
    env.run("worker", "stop", check=True)
    assert wait_until(lambda: not stack_processes_under(env.home), 10)


def test_bad_input_is_refused_clearly(env: Env, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = env.run("worker", "start", "--port", str(port))
        assert result.returncode != 0 and f"port {port} on 127.0.0.1 is already in use" \
            in result.stderr, result.stderr
    # The RPC server binds IPv4 addresses only: a name or IPv6 would start and exit at once.
    for args, said in [(["--host", "a;rm -rf ~"], "is not an IPv4 address"),
                       (["--host", "localhost"], "is not an IPv4 address"),
                       (["--host", "::1"], "binds IPv4 addresses only"),
                       (["--port", "70000"], "is not a port"),
                       (["--threads", "0"], "is below 1"),
                       (["--device", "CPU GPU"], "is not a device list")]:
        result = env.run("worker", "start", *args)
        assert result.returncode == 2 and said in result.stderr and "fix:" in result.stderr, \
            (args, result.stderr)
    # A device this machine lacks: the server ends at once, and so does the start.
    result = env.run("worker", "start", "--port", str(free_port()), "--device", "NOPE")
    assert result.returncode == 1 and "exited with code 1 after 0s, before it listened" \
        in result.stderr and "No devices found" in result.stderr, result.stderr
    missing = tmp_path / "no-such-rpc-server"
    (env.home / ".env").write_text(f"RPC_SERVER_BIN={missing}\n")
    result = env.run("worker", "start", "--port", str(free_port()))
    assert result.returncode == 1 and "RPC_SERVER_BIN" in result.stderr, result.stderr
    # Every address of this machine: the warning says so first, loudly, even when the start
    # then fails.
    port = free_port()
    result = env.run("worker", "start", "--host", "0.0.0.0", "--port", str(port))
    assert result.returncode == 1 and result.stderr.startswith(
        f"WARNING: this worker listens on 0.0.0.0:{port}, which other machines can reach"), \
        result.stderr
    assert "WARNING: llama.cpp's RPC server has no authentication" in result.stderr
    result = env.run("worker", "stop", "--port", "1")
    assert result.returncode == 3 and "no worker on port 1" in result.stderr
    assert not stack_processes_under(env.home)


def test_a_worker_whose_state_folder_is_deleted_ends(env: Env) -> None:
    """No command could find it any more: its supervisor ends, and its server with it."""
    port = free_port()
    worker = start(env, port)
    server, supervisor = psutil.Process(worker["pid"]), psutil.Process(worker["supervisor_pid"])
    shutil.rmtree(Path(worker["log_file"]).parent)

    def ended(proc: psutil.Process) -> bool:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE

    assert wait_until(lambda: ended(server) and ended(supervisor), 20, interval=0.2)
    assert wait_until(lambda: not stack_processes_under(env.home), 10)


def test_a_worker_log_stays_small_while_it_runs(env: Env) -> None:
    """Anyone who reaches a worker adds two lines to its log per connection, for as long as
    it runs: the log moves to worker.log.1 at LOG_MAX_BYTES, not only at a start."""
    env["LOG_MAX_BYTES"] = "100000"
    port = free_port()
    log_file = Path(start(env, port)["log_file"])
    # Months of connections, written at once (5,000 real ones take the server 10 minutes).
    with open(log_file, "ab") as grown:
        grown.write(b"Accepted client connection\nClient connection closed\n" * 3000)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    old = log_file.with_name("worker.log.1")
    assert wait_until(old.exists, 10), log_file.stat().st_size
    assert wait_until(lambda: "Client connection closed" in log_file.read_text(), 10)
    assert log_file.stat().st_size < 1000, log_file.read_text()
    for path in (log_file, old):
        assert path.stat().st_mode & 0o077 == 0  # the owner's only, as the first one
    assert workers(env)[port]["listening"]
    env.run("worker", "stop", check=True)
