"""The soak, short: bench/soak.py for 60 s on each engine (the real router and the real
llama-swap), six clients over three names of the real gemma model with room for two, plain,
streamed and abandoned requests, a config change and `model sync` every 12 s, two model
servers killed. `python -m bench --only soak` runs it longer and prints the figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import soak
from tests.test_llama_swap import llama_swap_binary, port_block

SECONDS = 60.0

# Room is set from the whole machine's memory and the verdicts judge latency: no other test
# may load models beside it (pytest -n).
pytestmark = pytest.mark.alone


@pytest.mark.parametrize("engine", ["llama-server", "llama-swap"])
def test_soak(engine: str, tmp_path: Path) -> None:
    settings: dict[str, str] = {}
    if engine == "llama-swap":
        settings = {"ENGINE": "llama-swap", "LLAMA_SWAP_BIN": str(llama_swap_binary(tmp_path)),
                    "LLAMA_SWAP_PORT": str(port_block())}
    result = soak.run_soak(tmp_path / "soak", settings, SECONDS)
    figures = result.figures()
    print(json.dumps(figures, indent=1))
    verdicts = figures["verdicts"]
    # More models than room, really met: admission evicted to load a third, or refused it
    # after the whole wait (both others busy), or other programs freed memory meanwhile for a
    # third (the room is set from the memory in use at the start).
    assert result.loads > 3, figures
    assert result.evictions > 0 or verdicts.get("busy", 0) > 0 or result.most_in_memory > 2, \
        figures
    assert verdicts.get("ok", 0) >= 20, figures
    assert result.kills == len(result.killed) == 2, "both model servers were killed"
    assert len(result.syncs) >= 3, figures
    # Every request answered as it should be, none past the bound, nothing left after stop,
    # the front's memory flat.
    assert figures["faults"] == [], "\n".join(figures["faults"] + result.log_tail[-20:])
    assert figures["longest_s"] < soak.HANG_BOUND
    assert result.left_after_stop == []
    growth, quarters = result.rss_growth(), result.rss_quarters()
    assert growth is not None and quarters and growth <= soak.rss_allowance(quarters[0]), figures
