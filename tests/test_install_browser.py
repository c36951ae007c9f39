"""install.sh --dev's test browser step (scripts/test_browser.sh) on machines where it cannot
install: no apt-get, no root and no sudo, apt-get failing (no network). Run with stand-ins for
`id`, `sudo` and `apt-get` that answer as the real programs do; the step must say what is
missing and how to get it, and leave the rest of the install going."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import REPO
from tests.test_services import recording_tool, tool

SHELL_TOOLS = ("bash", "sh", "env", "printf", "cat")


def run_step(tmp_path: Path, uid: int = 1000, sudo: bool = True, apt: str | None = "exit 0",
             yes: bool = True) -> subprocess.CompletedProcess[str]:
    """install_test_browser, as install.sh runs it, with only the stand-ins (and a shell) on
    PATH: no Chromium, no chromedriver. `apt`: the stand-in apt-get's body (None: none)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in SHELL_TOOLS:
        found = subprocess.run(["sh", "-c", f"command -v {name}"], capture_output=True,
                               text=True).stdout.strip()
        (bin_dir / name).symlink_to(found)
    tool(bin_dir, "id", f'[ "$1" = -u ] && echo {uid}')
    if sudo:
        recording_tool(bin_dir, "sudo", tmp_path / "sudo.calls",
                       '[ "$1" = -n ] && shift; exec "$@"')
    if apt is not None:
        recording_tool(bin_dir, "apt-get", tmp_path / "apt.calls", apt)
    script = (f'set -euo pipefail; YES={int(yes)}; cd {REPO}; . scripts/messages.sh; '
              'confirm() { [ "$YES" = 1 ]; }; . scripts/test_browser.sh; install_test_browser; '
              'echo "the install goes on"')
    return subprocess.run(["bash", "-c", script], env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=30)


def test_no_apt_get_says_what_is_missing(tmp_path: Path) -> None:
    result = run_step(tmp_path, apt=None)
    assert result.returncode == 0 and "the install goes on" in result.stdout, result.stderr
    assert "no apt-get here" in result.stderr and "missing: Chromium and chromedriver" in \
        result.stderr and "fix:" in result.stderr


def test_no_root_and_no_sudo_says_so(tmp_path: Path) -> None:
    result = run_step(tmp_path, sudo=False)
    assert result.returncode == 0 and "the install goes on" in result.stdout, result.stderr
    assert "needs root, and sudo is not here" in result.stderr
    assert not (tmp_path / "apt.calls").exists()


def test_apt_get_failing_leaves_the_install_going(tmp_path: Path) -> None:
    """No network: apt-get update fails. The install goes on and says what is missing;
    unattended, sudo never waits for a password (-n)."""
    result = run_step(tmp_path, apt='echo "E: could not resolve deb.debian.org" >&2; exit 100')
    assert result.returncode == 0 and "the install goes on" in result.stdout, result.stderr
    assert "apt-get could not install chromium and chromium-driver" in result.stderr
    assert "could not resolve" in result.stderr  # apt-get's own reason is shown
    assert (tmp_path / "sudo.calls").read_text().startswith("-n apt-get update")


def test_apt_get_without_the_packages_leaves_the_install_going(tmp_path: Path) -> None:
    """apt-get says it installed, but no chromium came of it (a distribution whose `chromium`
    is a stub): said, not taken for a test browser."""
    result = run_step(tmp_path, uid=0, sudo=False)
    assert result.returncode == 0 and "the install goes on" in result.stdout, result.stderr
    assert "apt-get could not install" in result.stderr
    calls = (tmp_path / "apt.calls").read_text().splitlines()
    assert calls[0] == "update -qq" and calls[1].startswith("install -y -qq chromium")
