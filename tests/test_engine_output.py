"""What the engine prints goes to the stack's log one line at a time, each cut to a bound: a
model server can print a whole prompt, or megabytes without a newline. The engine here is the
real llama-server behind a wrapper that first prints such lines, as the router."""

from __future__ import annotations

import shlex
from pathlib import Path

from model_serve.engines.llama_server import resolve_llama_server
from tests.conftest import Env, running

LONG = 3_000_000
BOUND = 65_536  # characters of one log line, at most


def test_long_engine_lines_are_cut_in_the_log(env: Env, gemma_path: Path,
                                              tmp_path: Path) -> None:
    wrapper = tmp_path / "bin" / "llama-server"
    wrapper.parent.mkdir()
    real = shlex.quote(str(resolve_llama_server(None)))
    wrapper.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" --models-preset "*)\n'
        f"  head -c {LONG} /dev/zero | tr '\\0' x; echo ' end of the long line'\n"
        "  echo 'a short line after it'\n"
        f"  head -c {LONG} /dev/zero | tr '\\0' y; echo;;\n"
        "esac\n"
        f"exec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    env.update({"LLAMA_SERVER_BIN": str(wrapper), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    (env.models / gemma_path.name).symlink_to(gemma_path)
    with running(env):
        assert env.run("status").returncode == 0
    lines = (env.state / "logs" / "model_serve.log").read_text().splitlines()
    longest = max(len(line) for line in lines)
    assert longest < BOUND, f"a log line of {longest} characters"
    cut = [line for line in lines if "xxxxxxxx" in line]
    assert len(cut) == 1 and "more bytes of this line not logged" in cut[0], cut[0][-120:]
    assert any(line.endswith("model_serve.engine INFO a short line after it") for line in lines)
    assert sum("yyyyyyyy" in line for line in lines) == 1
