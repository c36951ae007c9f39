"""Metal's working-set limit (Apple Silicon): the figures macOS and llama-server give, the
decision made from them, and admission keeping the loaded models under the limit.

There is no Mac here. The parsers are fed what the programs print: `sysctl -n` prints the bare
value; llama-server's --list-devices prints "  %s: %s (%zu MiB, %zu MiB free)" per device
(the format string in its libllama-common), where ggml-metal's total is
recommendedMaxWorkingSetSize; its start log prints that size in MB of 10^6 bytes. The M4 figures
are from a published start log ("recommendedMaxWorkingSetSize  = 26800.60 MB", "using device
Metal (Apple M4) (unknown id) - 25557 MiB free"); the --list-devices line is that device in
that format. The machine is an argument, so the Mac's path runs on Linux."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from model_serve.config.settings import load_settings
from model_serve.engines import select_engine
from model_serve.engines.base import LOADED_STATES, EngineModel
from model_serve.engines.llama_server import resolve_llama_server
from model_serve.engines.metal import (
    CACHE_NAME,
    GIB,
    MIB,
    GpuLimit,
    choose_limit,
    default_working_set,
    device_report,
    gpu_shortfall,
    held_by_others,
    parse_device_report,
    parse_wired_limit,
    read_gpu_limit,
)
from model_serve.machine import physical_memory
from model_serve.machine_code import Machine
from model_serve.runtime.admission import Admission, Refusal
from model_serve.runtime.engine_view import EngineView
from tests.conftest import TWIN, Env, running

APPLE_SILICON = Machine("darwin", "arm64")
M4_LIST_DEVICES = "Available devices:\n  MTL0: Apple M4 (25558 MiB, 25557 MiB free)\n"
M4_START_LOG = """\
ggml_metal_device_init: has unified memory    = true
ggml_metal_device_init: use residency sets    = true
ggml_metal_device_init: recommendedMaxWorkingSetSize  = 26800.60 MB
llama_model_load_from_file_impl: using device Metal (Apple M4) (unknown id) - 25557 MiB free
"""
OLDER_BUILD = "Available devices:\n  Metal: Apple M1 (10922 MiB, 10922 MiB free)\n"
LINUX_CPU_BUILD = "Available devices:\n  (none)\n"  # this machine's llama-server, verbatim


@pytest.mark.parametrize(("text", "size"), [
    (M4_LIST_DEVICES, 25558 * MIB),
    (M4_START_LOG, 26_800_600_000),
    (OLDER_BUILD, 10922 * MIB),
    ("Available devices:\n  BLAS: Accelerate (0 MiB, 0 MiB free)\n", None),
    (LINUX_CPU_BUILD, None),
    ("error: unknown argument: --list-devices\n", None),
])
def test_the_metal_device_is_read_from_llama_servers_report(text: str,
                                                            size: int | None) -> None:
    assert parse_device_report(text) == size


@pytest.mark.parametrize(("text", "mib"), [("0\n", 0), ("24576\n", 24576), ("", 0),
                                           ("sysctl: unknown oid 'iogpu.wired_limit_mb'", 0)])
def test_the_wired_limit_is_read_from_sysctl(text: str, mib: int) -> None:
    assert parse_wired_limit(text) == mib


def test_the_limit_comes_from_the_user_then_llama_server_then_the_default() -> None:
    ram = 32 * GIB
    assert choose_limit(28672, 25558 * MIB, ram).bytes == 28 * GIB
    assert "iogpu.wired_limit_mb=28672" in choose_limit(28672, None, ram).source
    assert choose_limit(0, 25558 * MIB, ram).bytes == 25558 * MIB
    assert "recommendedMaxWorkingSetSize" in choose_limit(0, 25558 * MIB, ram).source
    assert choose_limit(0, None, ram).bytes == ram * 2 // 3
    assert default_working_set(16 * GIB) == 16 * GIB * 2 // 3
    assert default_working_set(36 * GIB) == 24 * GIB
    assert default_working_set(64 * GIB) == 48 * GIB
    assert "3/4 of RAM" in choose_limit(0, None, 128 * GIB).source


def test_a_load_that_would_pass_the_limit_is_named_with_the_sysctl_that_raises_it() -> None:
    limit = choose_limit(0, 25558 * MIB, 32 * GIB)  # the M4 above: 24.96 GiB
    assert gpu_shortfall(limit, [8 * GIB, 9 * GIB], 7 * GIB) is None  # 24 GiB fit
    short = gpu_shortfall(limit, [8 * GIB, 9 * GIB], 8 * GIB)
    assert short is not None
    assert "working-set limit is 25.0 GiB (Metal's recommendedMaxWorkingSetSize" in short.why
    assert "(17.00 GiB) plus this one come to 25.00 GiB" in short.why
    assert "sudo sysctl iogpu.wired_limit_mb=25600" in short.fix  # 25 GiB, whole GiB up
    alone = gpu_shortfall(limit, [], 26 * GIB)
    assert alone is not None and "this model alone passes it" in alone.why
    assert "iogpu.wired_limit_mb=26624" in alone.fix
    # More than a Mac of this size can give the GPU: no sysctl would help.
    too_big = gpu_shortfall(limit, [], 30 * GIB)
    assert too_big is not None and "sysctl" not in too_big.fix
    assert "smaller quantization" in too_big.fix


def test_the_report_is_read_once_per_binary_and_only_on_apple_silicon(tmp_path: Path) -> None:
    """The real llama-server here (a CPU build: no Metal device) is asked once; its answer is
    kept for that binary file. Off Apple Silicon nothing is read at all."""
    binary = resolve_llama_server(None)
    assert read_gpu_limit(None, tmp_path, Machine("linux", "x86_64")) is None
    assert read_gpu_limit(None, tmp_path, Machine("darwin", "x86_64")) is None  # Intel Mac
    assert not (tmp_path / CACHE_NAME).exists()
    limit = read_gpu_limit(None, tmp_path, APPLE_SILICON)
    ram = physical_memory()
    assert limit == choose_limit(0, None, ram)  # no report, no sysctl here: the default
    records = json.loads((tmp_path / CACHE_NAME).read_text())
    assert list(records.values()) == [None] and str(binary.resolve()) in next(iter(records))
    # A recorded report is used as it is, without running the program again.
    (tmp_path / CACHE_NAME).write_text(json.dumps({next(iter(records)): 25558 * MIB}))
    assert device_report(binary, tmp_path) == 25558 * MIB
    assert read_gpu_limit(None, tmp_path, APPLE_SILICON) == choose_limit(0, 25558 * MIB, ram)


def test_a_report_that_does_not_come_is_not_awaited_at_every_admission(tmp_path: Path) -> None:
    """Admission asks for the limit at every poll, under its lock. A llama-server whose
    --list-devices hangs (a stand-in for one: the real one here answers at once) is waited for
    once; until UNANSWERED_RETRY the default share is used without running it again."""
    starts = tmp_path / "starts"
    hung = tmp_path / "llama-server"
    hung.write_text(f"#!/bin/sh\necho \"$@\" >> {starts}\nexec sleep 30\n")
    hung.chmod(0o755)
    assert device_report(hung, tmp_path, timeout=0.5) is None
    assert device_report(hung, tmp_path, timeout=0.5) is None
    assert starts.read_text().splitlines() == ["--list-devices"], "asked once, not twice"
    assert not (tmp_path / CACHE_NAME).exists(), "a report that did not come is not recorded"


def test_admission_keeps_the_loaded_models_under_the_gpu_limit(env: Env,
                                                                gemma_path: Path) -> None:
    """Two names of the real gemma model on the real router, with a recorded limit that holds
    one of them but not two, and memory plenty (threshold 99%): loading the second unloads the
    first; with the first busy, the second gets the 503 that names the GPU's limit and the
    sysctl; a model larger than the limit alone is refused at once."""
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(TWIN)
    env.update({"MIN_MODEL_AGE_SECONDS": "0", "PRESSURE_CHECK_INTERVAL": "3600",
                "MEMORY_PRESSURE_THRESHOLD": "99", "LOAD_QUEUE_TIMEOUT": "2"})
    need = GIB
    limit = GpuLimit(need * 3 // 2, "recorded", 32 * GIB)
    busy: set[str] = set()
    with running(env):
        settings = load_settings(dict(env))
        engine = select_engine(settings)
        first, second = (engine.model_id(n) for n in ("ls/gemma-3:270m-q4_k_m", "ls/g2"))
        admission = Admission(settings, engine, EngineView(engine),
                              lambda name: (int(name in busy), 0.0), gpu_limit=lambda: limit)

        def in_memory() -> set[str]:
            return {m.name for m in engine.models() if m.state in LOADED_STATES}

        async def scenario() -> tuple[Refusal | None, Refusal | None]:
            assert await admission.admit(first, need) is None
            assert in_memory() == {first}
            assert await admission.admit(second, need) is None
            assert in_memory() == {second}  # the first went before the second loaded
            busy.add(second)
            waited = await admission.admit(first, need)
            busy.clear()
            engine.unload(second)
            engine.wait_unloaded(second, 30)
            return waited, await admission.admit(first, 2 * need)

        waited, alone = asyncio.run(scenario())
        assert in_memory() == set()
    assert isinstance(waited, Refusal), waited
    assert "GPU's working-set limit is 1.5 GiB (recorded)" in waited.message
    assert "busy" in waited.message
    assert "sudo sysctl iogpu.wired_limit_mb=2048" in waited.message
    assert isinstance(alone, Refusal), alone
    assert "does not fit" in alone.message and "this model alone passes it" in alone.message
    assert "MEMORY_PRESSURE_THRESHOLD" not in alone.message


def test_doctor_shows_the_limit_and_warns_of_a_llama_server_without_metal(
        env: Env, tmp_path: Path) -> None:
    """This machine's llama-server, asked as if on Apple Silicon, names no Metal device: on a
    Mac that build would run every model on the CPU, and doctor says so."""
    from model_serve.commands import doctor

    settings = replace(load_settings(dict(env)), cache_dir=tmp_path / "cache")
    check = doctor._gpu_limit(settings, APPLE_SILICON)
    assert check.status == "warn" and "named no Metal device" in check.detail
    assert "macOS's usual default, 2/3 of RAM" in check.detail
    assert "brew install llama.cpp" in check.fix
    reported = settings.cache_dir / CACHE_NAME
    records = json.loads(reported.read_text())
    reported.write_text(json.dumps({key: 25558 * MIB for key in records}))
    check = doctor._gpu_limit(settings, APPLE_SILICON)
    assert check.status == "ok" and "25.0 of" in check.detail
    assert "recommendedMaxWorkingSetSize" in check.detail
    assert doctor._gpu_limit(settings, Machine("darwin", "x86_64")).status == "ok"


def test_what_the_other_models_hold() -> None:
    """Loading, loaded and stopping models hold Metal buffers; a sleeping one (the router's
    sleep freed its weights and KV cache), an unloaded or failed one, and the model being
    admitted do not."""
    models = [EngineModel("a", "loaded"), EngineModel("b", "loading"),
              EngineModel("c", "stopping"), EngineModel("d", "sleeping"),
              EngineModel("e", "unloaded"), EngineModel("f", "failed"),
              EngineModel("g", "loaded"), EngineModel("target", "stopping")]
    footprints = {"a": 1, "b": 2, "c": 4, "d": 8, "e": 16, "f": 32, "target": 64}
    assert held_by_others(models, footprints, "target") == [1, 2, 4, 0]  # g: none recorded


def test_the_front_tells_admission_every_models_footprint(env: Env, gemma_path: Path) -> None:
    """A front started while models are loaded (restarted by the supervisor) counts them
    against the GPU's limit before any request for them arrives."""
    from model_serve.runtime.front import Front

    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(TWIN)
    env.run("sync", check=True)
    front = Front(load_settings(dict(env)))
    asyncio.run(front.refresh_names())
    routes = {r.engine_id: r.footprint for r in front.names.routes.values()}
    assert len(routes) == 2 and all(size > 100 * MIB for size in routes.values())
    assert front.admission.footprints == routes
