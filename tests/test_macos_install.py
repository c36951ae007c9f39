"""install.sh on a Mac, run on Linux: a copy of the checkout's install.sh and scripts/, with
stand-ins for `uname` (Darwin, arm64), `sysctl` (an Apple Silicon Mac), Homebrew and the
Pythons install.sh may choose. Each stand-in answers only what install.sh asks, as the real
program does; install.sh stops at `pip`, which the stand-in Pythons lack."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import REPO
from tests.test_services import tool


def python_standin(bin_dir: Path, version: str, arch: str = "arm64", name: str = "python3"
                   ) -> Path:
    """A Python as install.sh asks it: its version, its arch, `-m venv` (which copies it into
    the new .venv); pip and anything else fail, so install.sh stops right after .venv."""
    new_enough = 0 if tuple(map(int, version.split(".")[:2])) >= (3, 10) else 1
    return tool(bin_dir, name, f"""case "$*" in
*version_info*) exit {new_enough} ;;
--version) echo "Python {version}" ;;
*platform.machine*) echo {arch} ;;
"-m venv .venv") mkdir -p .venv/bin && cp "$0" .venv/bin/python ;;
*) echo "stand-in python {version}: $*" >&2; exit 1 ;;
esac""")


def install_on_a_mac(tmp_path: Path, path_python: str = "3.12.8", brew_python: str | None = None,
                     translated: str = "0", homebrew: bool = True, brew_name: str = "python3"
                     ) -> subprocess.CompletedProcess[str]:
    """install.sh from a copy of the checkout, with python3 on PATH at `path_python` and
    Homebrew (with its own python3 at `brew_python`) on PATH after it."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "install.sh", checkout)
    for script in ("messages.sh", "macos.sh"):
        shutil.copy2(REPO / "scripts" / script, checkout / "scripts")
    standins, brew_bin = tmp_path / "standins", tmp_path / "homebrew" / "bin"
    tool(standins, "uname", 'case "$1" in -m) echo arm64 ;; *) echo Darwin ;; esac')
    tool(standins, "sysctl", f'case "$2" in hw.optional.arm64) echo 1 ;; '
                             f'sysctl.proc_translated) echo {translated} ;; *) exit 1 ;; esac')
    python_standin(standins, path_python)
    tool(brew_bin, "brew", f'case "$1" in --prefix) echo {tmp_path / "homebrew"} ;; esac')
    if brew_python:
        python_standin(brew_bin, brew_python, name=brew_name)
    path = f"{standins}:{brew_bin}:/usr/bin:/bin" if homebrew else f"{standins}:/usr/bin:/bin"
    return subprocess.run(["bash", str(checkout / "install.sh"), "--yes"], text=True,
                          env={"PATH": path, "HOME": str(tmp_path)}, capture_output=True,
                          timeout=60)


def test_rosetta_is_refused_before_venv_is_built(tmp_path: Path) -> None:
    result = install_on_a_mac(tmp_path, translated="1")
    assert result.returncode == 1 and "under Rosetta" in result.stderr, result.stderr
    assert "rm -rf .venv" in result.stderr, "says to remove a .venv made under Rosetta"
    assert not (tmp_path / "checkout" / ".venv").exists(), "refused before .venv was built"


def test_homebrew_is_looked_for_before_python_is_chosen(tmp_path: Path) -> None:
    result = install_on_a_mac(tmp_path, homebrew=False)
    assert result.returncode == 1 and "Homebrew is needed" in result.stderr, result.stderr
    assert not (tmp_path / "checkout" / ".venv").exists()


def test_homebrews_python_is_preferred_to_an_older_one_on_path(tmp_path: Path) -> None:
    """The Command Line Tools' python3 is 3.9: Homebrew's python3 builds .venv instead."""
    result = install_on_a_mac(tmp_path, path_python="3.9.6", brew_python="3.12.8")
    brew_python = tmp_path / "homebrew" / "bin" / "python3"
    assert f"Python: {brew_python} (Homebrew's; python3 on PATH is Python 3.9.6)" \
        in result.stdout, result.stdout + result.stderr
    venv_python = (tmp_path / "checkout" / ".venv" / "bin" / "python").read_text()
    assert "stand-in python 3.12.8" in venv_python, ".venv was made by Homebrew's Python"
    # The stand-in has no pip: install.sh stops there, past the Python it chose.
    assert "pip could not install the package" in result.stderr
    # A new enough python3 on PATH is kept.
    kept = install_on_a_mac(tmp_path / "new", path_python="3.11.9", brew_python="3.12.8")
    assert "Homebrew's" not in kept.stdout
    assert "3.11.9" in (tmp_path / "new" / "checkout" / ".venv" / "bin" / "python").read_text()
    # `brew install python@3.12` links python3.12 alone (python3 is its main Python's).
    versioned = install_on_a_mac(tmp_path / "versioned", path_python="3.9.6",
                                 brew_python="3.12.8", brew_name="python3.12")
    assert f"Python: {tmp_path}/versioned/homebrew/bin/python3.12 (Homebrew's" \
        in versioned.stdout, versioned.stdout + versioned.stderr
    without = install_on_a_mac(tmp_path / "no-brew-python", path_python="3.9.6")
    assert without.returncode == 1 and "brew install python" in without.stderr
    assert "Python 3.9.6" in without.stderr


def test_a_venv_made_under_rosetta_is_named_with_the_fix(tmp_path: Path) -> None:
    python_standin(tmp_path / "checkout" / ".venv" / "bin", "3.12.8", arch="x86_64",
                   name="python")
    result = install_on_a_mac(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ".venv was made by an x86_64 Python under Rosetta" in result.stderr
    assert "rm -rf .venv" in result.stderr
    assert (tmp_path / "checkout" / ".venv").is_dir(), "the user's folder is left to them"


def test_a_venv_made_by_an_old_python_is_named_with_the_fix(tmp_path: Path) -> None:
    """A .venv left by the Command Line Tools' 3.9 would be reused as it is."""
    python_standin(tmp_path / "checkout" / ".venv" / "bin", "3.9.6", name="python")
    result = install_on_a_mac(tmp_path, path_python="3.9.6", brew_python="3.12.8")
    assert result.returncode == 1, result.stdout + result.stderr
    assert ".venv was made by Python 3.9.6, older than 3.10" in result.stderr
    assert f"it uses {tmp_path}/homebrew/bin/python3" in result.stderr
