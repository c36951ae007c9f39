"""macOS logic that runs the same on Linux: memory read from `vm_stat` and `sysctl` output
(laid out as those programs print it, with the figures of a 32 GiB Apple Silicon Mac), LM
Studio's folders, the folders macOS protects, lsof, Homebrew's folders and platform hints."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from model_serve import machine
from model_serve.commands import doctor
from model_serve.config.settings import load_settings
from model_serve.models.catalog import ensure_models_dir
from model_serve.programs import find_on_path
from model_serve.runtime import procs
from model_serve.runtime.memory import (
    MemoryReading,
    macos_pressure_level,
    macos_used_bytes,
    parse_vm_stat,
)
from model_serve.runtime.procs import lsof_listener_pid, parse_lsof_pids
from model_serve.service.privacy import privacy_fix, privacy_warnings, protected_area
from tests import ollama_store
from tests.conftest import REPO, Env
from tests.test_services import tool

GIB = 2**30
TOTAL = 32 * GIB
PAGE = 16384


G = GIB // PAGE  # pages in a GiB


def vm_stat(*, active: int, wired: int, occupied: int, stored: int, inactive: int,
            swapouts: int = 0) -> str:
    """`vm_stat` output of a 32 GiB Mac with these page counts (16 KiB pages); free pages are
    the rest, as on a Mac where every page is in one of vm_stat's queues."""
    speculative = 4210
    free = TOTAL // PAGE - (active + inactive + speculative + wired + occupied)
    assert free >= 0 and stored >= occupied, "not a state a Mac can be in"
    return f"""Mach Virtual Memory Statistics: (page size of {PAGE} bytes)
Pages free:                               {free}.
Pages active:                             {active}.
Pages inactive:                           {inactive}.
Pages speculative:                        {speculative}.
Pages throttled:                               0.
Pages wired down:                         {wired}.
Pages purgeable:                            1877.
"Translation faults":                  912830112.
Pages copy-on-write:                    18734523.
Pages zero filled:                     402371245.
Pages reactivated:                       3320148.
Pages purged:                             811294.
File-backed pages:                        301233.
Anonymous pages:                          {active + inactive + speculative - 301233}.
Pages stored in compressor:               {stored}.
Pages occupied by compressor:             {occupied}.
Decompressions:                          2291842.
Compressions:                            4012773.
Pageins:                                 9012345.
Pageouts:                                  10234.
Swapins:                                 {swapouts // 3}.
Swapouts:                                {swapouts}.
"""


def old_percent(text: str) -> float:
    """The reading before compressed memory counted at its original size."""
    pages = parse_vm_stat(text)[1]
    physical = ("Pages active", "Pages wired down", "Pages occupied by compressor")
    return 100 * sum(pages[name] for name in physical) * PAGE / TOTAL


def percent(text: str) -> float:
    return MemoryReading(TOTAL, macos_used_bytes(text)).percent


# 16 GiB of app memory, 10 GiB wired (a model among it), a small compressor (1.75:1).
BEFORE = vm_stat(active=16 * G, wired=10 * G, occupied=G // 4, stored=28_672,
                 inactive=3 * G)
# Compression alone: macOS compresses 6 GiB of app memory into 3.25 GiB more compressor pages;
# the 2.75 GiB it saves become free pages.
COMPRESSED = vm_stat(active=10 * G, wired=10 * G, occupied=G * 7 // 2, stored=28_672 + 6 * G,
                     inactive=3 * G)
# Then a model server wires 3.5 GiB of those free pages.
UNDER_PRESSURE = vm_stat(active=10 * G, wired=27 * G // 2, occupied=G * 7 // 2,
                         stored=28_672 + 6 * G, inactive=3 * G)
# A calm Mac after weeks up: idle apps compressed 9:1 into 4 GiB, most of it swapped out, the
# compressor storing 36 GiB, more than the RAM; a 7 GiB model loaded, 8.5 GiB of file cache.
CALM = vm_stat(active=7 * G, wired=10 * G, occupied=4 * G, stored=36 * G,
               inactive=17 * G // 2, swapouts=5_123_456)


def test_vm_stat_parses_page_size_and_counts() -> None:
    page_size, counts = parse_vm_stat(BEFORE)
    assert page_size == 16384
    assert counts["Pages active"] == 1_048_576
    assert counts["Translation faults"] == 912830112
    assert counts["Pages occupied by compressor"] == 16_384
    assert counts["Pages stored in compressor"] == 28_672
    assert counts["Pages free"] == 176_014


def test_used_counts_active_wired_and_the_compressor_at_what_it_stores() -> None:
    # Its 0.19 GiB saving fits under both bounds (the free pages, the compressor's own pages).
    assert macos_used_bytes(BEFORE) == (1_048_576 + 655_360 + 28_672) * PAGE
    assert percent(BEFORE) == pytest.approx(82.6, abs=0.1)


def test_compression_does_not_lower_the_percent() -> None:
    assert percent(COMPRESSED) == pytest.approx(percent(BEFORE))
    assert old_percent(COMPRESSED) == pytest.approx(73.4, abs=0.1), "fell under the line"
    assert percent(UNDER_PRESSURE) > percent(COMPRESSED) > 75
    assert percent(UNDER_PRESSURE) == pytest.approx(90.4, abs=0.1)


def test_a_calm_mac_whose_compressor_stores_more_than_its_ram_stays_under_the_line() -> None:
    pages = parse_vm_stat(CALM)[1]
    assert pages["Pages stored in compressor"] * PAGE > TOTAL
    assert percent(CALM) < 75
    # Counted: its physical pages and its free pages (2.4 GiB), not the cache, not 36 GiB.
    free = pages["Pages free"] * PAGE
    assert macos_used_bytes(CALM) == (7 + 10 + 4) * GIB + free
    # A big app quitting frees 5 GiB: the percent falls, the idle compressed apps stay cold.
    quit_app = vm_stat(active=2 * G, wired=10 * G, occupied=4 * G, stored=36 * G,
                       inactive=17 * G // 2, swapouts=5_123_456)
    assert percent(quit_app) < percent(CALM) - 10
    assert macos_used_bytes(quit_app) == (2 + 10 + 4 + 4) * GIB, "at most a 2:1 saving counted"


def test_the_page_size_comes_from_the_header() -> None:
    intel = BEFORE.replace("page size of 16384 bytes", "page size of 4096 bytes")
    assert macos_used_bytes(intel) == macos_used_bytes(BEFORE) // 4


@pytest.mark.parametrize("text", ["", "Pages active: 12.\n",
                                  "Mach Virtual Memory Statistics: (page size of 4096 bytes)\n"
                                  "Pages active: 1.\n",
                                  BEFORE.replace("Pages stored in compressor", "Stored")])
def test_unusable_vm_stat_output_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        macos_used_bytes(text)


@pytest.mark.parametrize(("output", "level"), [("1\n", "normal"), ("2\n", "warn"),
                                               ("4\n", "critical"), ("", None), ("7", None)])
def test_kernel_pressure_level(output: str, level: str | None) -> None:
    assert macos_pressure_level(output) == level
    reading = MemoryReading(TOTAL, TOTAL // 2, level)
    assert reading.kernel_asks == (level in ("warn", "critical"))
    assert not reading.over(75), "the level alone never makes the percent over the line"


# --- LM Studio's folder ---------------------------------------------------------------------------
@pytest.mark.parametrize(("present", "chosen"), [
    ((), ".cache/lm-studio/models"),
    ((".lmstudio/models",), ".lmstudio/models"),
    ((".cache/lm-studio/models",), ".cache/lm-studio/models"),
    ((".cache/lm-studio/models", ".lmstudio/models"), ".cache/lm-studio/models"),
])
def test_models_dir_default_follows_lm_studio(tmp_path: Path, present: tuple[str, ...],
                                              chosen: str) -> None:
    home = tmp_path / "user"
    for folder in present:
        (home / folder).mkdir(parents=True)
    settings = load_settings({"HOME": str(home), "MODEL_SERVE_HOME": str(tmp_path / "ms")})
    assert settings.models_dir == home / chosen
    assert settings.sources["MODELS_DIR"] == "the defaults"
    ensure_models_dir(settings)  # creates the original only when neither exists
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("models")) == \
        sorted({chosen, *present})


def gguf_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def test_both_lm_studio_folders_the_one_with_your_own_models_wins_and_stays(
        tmp_path: Path) -> None:
    home = tmp_path / "user"
    original, current = home / ".cache" / "lm-studio" / "models", home / ".lmstudio" / "models"
    # The original holds only what model_serve put there: the bridge's links into Ollama's
    # store and a `model add` link; current LM Studio downloaded a model of the user's own.
    blob = gguf_file(home / ".ollama" / "models" / "blobs" / "sha256-1f2e")
    bridged = original / "ollama" / "gemma3" / "gemma3-27b-27.4B-Q8_0.gguf"
    bridged.parent.mkdir(parents=True)
    bridged.symlink_to(blob)
    (original / "ollama" / ".ollama-bridge.json").write_text("{}")
    (original / "added").mkdir()
    (original / "added" / "mine.gguf").symlink_to(gguf_file(home / "elsewhere" / "mine.gguf"))
    gguf_file(current / "lmstudio-community" / "Qwen3-8B-GGUF" / "Qwen3-8B-Q4_K_M.gguf")
    environ = {"HOME": str(home), "MODEL_SERVE_HOME": str(tmp_path / "ms")}

    settings = load_settings(environ)
    assert settings.models_dir == current
    ensure_models_dir(settings)  # the stack uses it: the choice is kept from now on
    assert (settings.state_dir / "models-dir").read_text() == f"{current}\n"
    # A model of the user's own appears in the original too: no flip.
    gguf_file(original / "bartowski" / "Llama-3.2-1B-GGUF" / "Llama-3.2-1B-Q4_K_M.gguf")
    kept = load_settings(environ)
    assert kept.models_dir == current
    assert doctor._models_dir(kept).fix == f"set MODELS_DIR={original} in .env to serve that " \
                                           "one instead"
    # Both folders hold the user's models, nothing kept yet: the original, as before.
    fresh = {**environ, "MODEL_SERVE_HOME": str(tmp_path / "ms2")}
    assert load_settings(fresh).models_dir == original
    # The kept folder removed: chosen again, and that choice kept.
    shutil.rmtree(current)
    again = load_settings(environ)
    assert again.models_dir == original
    ensure_models_dir(again)
    assert (again.state_dir / "models-dir").read_text() == f"{original}\n"


def test_a_models_dir_the_user_set_is_kept(tmp_path: Path) -> None:
    home = tmp_path / "user"
    (home / ".lmstudio" / "models").mkdir(parents=True)
    settings = load_settings({"HOME": str(home), "MODEL_SERVE_HOME": str(tmp_path / "ms"),
                              "MODELS_DIR": "~/.cache/lm-studio/models"})
    assert settings.models_dir == home / ".cache" / "lm-studio" / "models"


# --- folders macOS protects from launchd and cron -------------------------------------------------
@pytest.mark.parametrize(("relative", "area"), [
    ("Documents/model_serve", "~/Documents"),
    ("Desktop", "~/Desktop"),
    ("Downloads/models/ollama", "~/Downloads"),
    ("Library/Mobile Documents/com~apple~CloudDocs/models", "iCloud Drive"),
    ("Library/CloudStorage/Dropbox/models", "a cloud storage folder"),
    ("models", None),
    ("DocumentsArchive/models", None),
    (".cache/lm-studio/models", None),
])
def test_protected_areas(tmp_path: Path, relative: str, area: str | None) -> None:
    found = protected_area(tmp_path / relative, tmp_path)
    assert (found is None) if area is None else found.startswith(area)


def test_volumes_and_links_into_protected_folders(tmp_path: Path) -> None:
    assert protected_area(Path("/Volumes/External/models"), tmp_path).startswith("/Volumes")
    (tmp_path / "Documents" / "models").mkdir(parents=True)
    (tmp_path / "models").symlink_to(tmp_path / "Documents" / "models")
    assert protected_area(tmp_path / "models", tmp_path) == "~/Documents"


def test_privacy_warnings_name_each_folder_and_doctor_reports_them(tmp_path: Path) -> None:
    home = tmp_path / "user"
    models = home / "Downloads" / "models"
    models.mkdir(parents=True)
    settings = load_settings({"HOME": str(home), "MODEL_SERVE_HOME": str(tmp_path / "ms"),
                              "MODELS_DIR": str(models)})
    [warning] = privacy_warnings(settings, checkout=tmp_path / "checkout")
    assert warning.startswith(f"MODELS_DIR ({models}) is in ~/Downloads")
    assert len(privacy_warnings(settings, checkout=home / "Documents" / "model_serve")) == 2
    check = doctor._privacy(settings)
    assert check.status == "warn" and "Full Disk Access" in check.fix
    clean = load_settings({"HOME": str(home), "MODEL_SERVE_HOME": str(tmp_path / "ms"),
                           "MODELS_DIR": str(tmp_path)})
    assert privacy_warnings(clean, checkout=tmp_path / "checkout") == []


def test_privacy_checks_programs_the_kv_cache_and_keys_files(tmp_path: Path) -> None:
    home = tmp_path / "user"
    server = home / "Downloads" / "llama.cpp" / "build" / "bin" / "llama-server"
    swap = home / "Desktop" / "bin" / "llama-swap"  # found on this shell's PATH
    for program in (server, swap):
        program.parent.mkdir(parents=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    keys = home / "Documents" / "keys.txt"
    keys.parent.mkdir()
    keys.write_text("sk-local-1\n")
    keys.chmod(0o600)
    environ = {"HOME": str(home), "MODEL_SERVE_HOME": str(tmp_path / "ms"),
               "MODELS_DIR": str(tmp_path / "models"), "LLAMA_SERVER_BIN": str(server),
               "KV_CACHE_DIR": str(home / "Library" / "CloudStorage" / "Box" / "kv"),
               "API_KEYS_FILE": str(keys), "PATH": f"{swap.parent}:/usr/bin:/bin"}
    settings = load_settings(environ)
    warnings = privacy_warnings(settings, checkout=tmp_path / "checkout", environ=environ)
    named = sorted(warning.split(" (")[0] for warning in warnings)
    assert named == ["API_KEYS_FILE", "KV_CACHE_DIR", "LLAMA_SERVER_BIN", "LLAMA_SWAP_BIN"]
    assert any(f"LLAMA_SWAP_BIN ({swap}) is in ~/Desktop" in warning for warning in warnings)


def homebrew_link(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def test_full_disk_access_hint_names_the_programs_that_open_the_folders(tmp_path: Path) -> None:
    """Homebrew's layout: bin/ and opt/ links into Cellar/<formula>/<version>, which changes at
    every upgrade; a .venv made by Homebrew's Python points at its opt/ link."""
    brew = tmp_path / "homebrew"
    for real in ("Cellar/bash/5.2.37/bin/bash", "Cellar/python@3.12/3.12.8/bin/python3.12"):
        (brew / real).parent.mkdir(parents=True)
        (brew / real).write_text("#!/bin/sh\n")
        (brew / real).chmod(0o755)
    homebrew_link(brew / "bin" / "bash", "../Cellar/bash/5.2.37/bin/bash")
    homebrew_link(brew / "opt" / "python@3.12", "../Cellar/python@3.12/3.12.8")
    checkout = tmp_path / "checkout"
    homebrew_link(checkout / ".venv" / "bin" / "python3.12",
                  f"{brew}/opt/python@3.12/bin/python3.12")
    homebrew_link(checkout / ".venv" / "bin" / "python", "python3.12")
    fix = privacy_fix(checkout, service_path=f"{brew}/bin:/usr/bin:/bin")
    assert f"{brew}/bin/bash (runs ./model; Homebrew's: if the service fails after a " \
           "'brew upgrade', give access again)" in fix
    assert f"{brew}/opt/python@3.12/bin/python3.12 (.venv's Python; Homebrew's" in fix
    assert "Cellar" not in fix, "never a folder the next upgrade replaces"
    assert fix.endswith("for the cron keep-alive /usr/sbin/cron")
    # Without Homebrew's bash, the system's; a Python outside Homebrew by its real path.
    (checkout / ".venv" / "bin" / "python3.12").unlink()
    homebrew_link(checkout / ".venv" / "bin" / "python3.12", sys.executable)
    plain = privacy_fix(checkout, service_path="/usr/bin:/bin")
    bash = os.path.realpath(shutil.which("bash", path="/usr/bin:/bin") or "")
    assert f"{bash} (runs ./model) and {os.path.realpath(sys.executable)} (.venv's Python);" \
        in plain


# --- who holds the port ---------------------------------------------------------------------------
def test_lsof_output_names_the_listener() -> None:
    # `lsof -nP -iTCP:5847 -sTCP:LISTEN -Fp` as macOS prints it for the user's own process.
    assert parse_lsof_pids("p812\n") == [812]
    assert parse_lsof_pids("p812\nf7\np977\n") == [812, 977]
    assert parse_lsof_pids("") == []


def test_lsof_finds_a_real_listener() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        expected = os.getpid() if shutil.which("lsof") else None
        assert lsof_listener_pid(port) == expected
        assert procs.listener_pid(port) == os.getpid()
        assert procs.who_listens(port).endswith(f"(pid {os.getpid()})")


# --- Homebrew's folders and platform hints -------------------------------------------------------
def test_homebrew_folders_are_searched_on_macos_only(tmp_path: Path) -> None:
    brew_bin = tmp_path / "opt" / "homebrew" / "bin"
    brew_bin.mkdir(parents=True)
    program = brew_bin / "llama-swap-for-this-test"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    name = program.name
    assert find_on_path(name, platform="darwin", homebrew=(brew_bin,)) == program
    assert find_on_path(name, platform="linux", homebrew=(brew_bin,)) is None


def test_store_access_hint_fits_the_platform() -> None:
    assert "usermod" in doctor._store_access_fix(Path("/usr/share/ollama/.ollama/models"),
                                                 platform="linux")
    mac = doctor._store_access_fix(Path("/Users/me/.ollama/my models"), platform="darwin")
    assert "usermod" not in mac and "chown" in mac and "'/Users/me/.ollama/my models'" in mac


# --- a bare PATH, as launchd and cron give -------------------------------------------------------
def test_sync_runs_the_bundled_bridge_without_python3_on_path(env: Env) -> None:
    ollama_store.add_model(Path(env["OLLAMA_MODELS"]), "gemma3:27b", model_type="27.4B",
                           file_type="Q8_0", arch="gemma3")
    env["PATH"] = str(env.home / "empty-bin")  # no python3 for the bridge's #! line to find
    result = env.run("sync")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (env.models / "ollama" / "gemma3" / "gemma3-27b-27.4B-Q8_0.gguf").is_symlink()
    assert "ls/gemma3:27.4b-q8_0" in env.run("list").stdout


# --- install.sh on a Mac: Homebrew and Rosetta (scripts/macos.sh with stand-in system tools) ------
def macos_shell(tmp_path: Path, script: str, arm64: str = "1", translated: str = "0",
                python_arch: str = "arm64", brew_prefix: str = "/opt/homebrew"
                ) -> subprocess.CompletedProcess[str]:
    """Run `script` after sourcing scripts/macos.sh, with `sysctl` answering like a Mac, a
    Python reporting `python_arch`, and a Homebrew in tmp/opt/homebrew (not on PATH)."""
    bin_dir = tmp_path / "standins"
    tool(bin_dir, "sysctl", f'case "$2" in hw.optional.arm64) echo {arm64} ;; '
                            f'sysctl.proc_translated) echo {translated} ;; *) exit 1 ;; esac')
    tool(bin_dir, "python-here", f"echo {python_arch}")
    brew_bin = tmp_path / "opt" / "homebrew" / "bin"
    tool(brew_bin, "brew", f'case "$1" in shellenv) echo "export PATH=\\"{brew_bin}:$PATH\\"" ;;'
                           f' --prefix) echo {brew_prefix} ;; esac')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    lines = [f". {shlex.quote(str(REPO / 'scripts' / 'messages.sh'))}",
             f". {shlex.quote(str(REPO / 'scripts' / 'macos.sh'))}", script]
    return subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], env=env,
                          text=True, capture_output=True, timeout=30, cwd=tmp_path)


def test_homebrew_is_found_where_the_profile_did_not_put_it(tmp_path: Path) -> None:
    brew = tmp_path / "opt" / "homebrew" / "bin" / "brew"
    found = macos_shell(tmp_path, f"find_homebrew /nowhere/brew {brew}; command -v brew")
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines()[-1] == str(brew)
    missing = macos_shell(tmp_path, "find_homebrew /nowhere/brew || echo none")
    assert missing.stdout.splitlines()[-1] == "none"


@pytest.mark.parametrize(("settings", "refusal"), [
    ({}, None),
    ({"arm64": "0", "python_arch": "x86_64", "brew_prefix": "/usr/local"}, None),  # Intel Mac
    ({"translated": "1"}, "this shell runs as x86_64 under Rosetta"),
    ({"python_arch": "x86_64"}, "is an x86_64 Python on an Apple Silicon Mac"),
    ({"brew_prefix": "/usr/local"}, "is the Intel one"),
])
def test_rosetta_is_refused_with_a_fix(tmp_path: Path, settings: dict[str, str],
                                       refusal: str | None) -> None:
    brew = tmp_path / "opt" / "homebrew" / "bin" / "brew"
    result = macos_shell(tmp_path, f"find_homebrew {brew}; refuse_rosetta "
                                   f"{tmp_path / 'standins' / 'python-here'}; echo native",
                         **settings)
    if refusal is None:
        assert result.returncode == 0 and result.stdout.endswith("native\n"), result.stderr
    else:
        assert result.returncode == 1 and refusal in result.stderr
        assert "  fix: " in result.stderr and "native" not in result.stdout


def test_a_live_process_is_alive_where_there_is_no_proc(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """On macOS every process read as dead (a /proc fast path answered 'no such process').
    Here model_serve's own code believes it is on darwin and finds no /proc or /sys (the
    portable lane's guard); psutil still reads /proc, as it reads sysctl on a Mac."""
    machine.install_guard()
    refusals = tmp_path / "refused"
    monkeypatch.setenv(machine.REFUSALS_VARIABLE, str(refusals))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ref = procs.ProcRef.of(child.pid)
        assert ref is not None
        with monkeypatch.context() as darwin:
            darwin.setattr(sys, "platform", "darwin")
            machine._proc_start(child.pid)  # the Linux fast path, called as a mistake would
            assert f"open /proc/{child.pid}/stat from {machine.__file__}" in refusals.read_text()
            refusals.unlink()
            assert ref.alive()
            child.kill()
            child.wait(timeout=10)
            assert not ref.alive()
        assert not refusals.exists(), refusals.read_text()
    finally:
        child.kill()
        child.wait(timeout=10)
