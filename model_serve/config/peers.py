"""Other servers whose models this port serves too (PEERS), and the keys we send them.

`PEERS=studio=http://studio.local:5847,gpu=https://gpu.lan/api`: each peer's models are served
here as `<peer>/<its own name>`. The key for a peer lives in PEER_KEYS_FILE (`NAME=KEY` lines,
owner-only), never in `.env`: keys are not settings others may read. PEER_TIMEOUT says how
long a peer may stay silent (llama-swap's peer `timeouts.responseHeader`, which also bounds a
stream's stall here).
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from model_serve.errors import ConfigError

# A peer's name is the first part of its models' names here: no '/', nothing a URL escapes.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Peer:
    name: str
    url: str  # base URL without a trailing '/': request paths are appended to it
    key: str = field(default="", repr=False)  # sent as a Bearer key; empty = no key
    timeout: float = 300.0  # seconds it may stay silent (PEER_TIMEOUT); 0 = no limit

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


def parse_peers(raw: str, source: str, model_prefix: str) -> tuple[tuple[str, str], ...]:
    """`NAME=URL` pairs, comma separated, as (name, url)."""
    found: dict[str, str] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, equals, url = (s.strip() for s in part.partition("="))
        where = f"PEERS (from {source}): {part!r}"
        if not equals or not name or not url:
            raise ConfigError(f"{where} is not NAME=URL",
                              "write PEERS as NAME=URL pairs, comma separated, e.g. "
                              "PEERS=studio=http://studio.local:5847")
        if not NAME.match(name):
            raise ConfigError(f"{where}: the name {name!r} may hold only letters, digits, "
                              "'.', '_' and '-' (it becomes the first part of its models' "
                              "names, before a '/')", "rename the peer in PEERS")
        split = urlsplit(url)
        if split.scheme not in ("http", "https") or not split.hostname or split.query or \
                split.fragment:
            raise ConfigError(f"{where}: {url!r} is not an http:// or https:// base URL",
                              "give the peer's base URL, e.g. http://studio.local:5847 (the "
                              "request's path, /v1/chat/completions, is appended to it)")
        if split.username or split.password:
            raise ConfigError(f"{where}: the URL holds a user or password",
                              f"put the peer's key in PEER_KEYS_FILE as {name}=KEY instead")
        if name.lower() in {n.lower() for n in found}:
            raise ConfigError(f"PEERS (from {source}) names the peer {name!r} twice",
                              "give each peer one NAME=URL pair")
        if model_prefix and model_prefix.rstrip("/").lower() == name.lower():
            raise ConfigError(f"PEERS (from {source}): the peer {name!r} is the prefix of this "
                              f"server's own model names (MODEL_PREFIX={model_prefix}), so "
                              "its models' names would collide with ours",
                              "rename the peer in PEERS")
        found[name] = url.rstrip("/")
    return tuple(found.items())


def read_peer_keys(path: Path, source: str, peers: tuple[tuple[str, str], ...]
                   ) -> dict[str, str]:
    """NAME=KEY lines ('#' comments and blank lines skipped) for the peers PEERS names. A
    missing file means no peer needs a key; one others may read is refused, as are lines
    for peers PEERS does not name (a misspelt name would silently send no key)."""
    where = f"PEER_KEYS_FILE={path} (from {source})"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc}",
                          "fix the path or the file's permissions") from exc
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(f"{where} may be read by other users (mode "
                          f"{stat.S_IMODE(mode):o}): it holds the keys to other servers",
                          f"chmod 600 {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} cannot be read: {exc}",
                          "fix the path or the file's permissions") from exc
    names = {name.lower(): name for name, _url in peers}
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, key = (s.strip() for s in line.partition("="))
        if not equals or not name or not key:
            # The line itself is not quoted: it may be a key.
            raise ConfigError(f"{where}, line {number}, is not NAME=KEY",
                              "write one NAME=KEY line per peer (NAME as in PEERS)")
        if name.lower() not in names:
            raise ConfigError(f"{where}, line {number}, is for {name!r}, which PEERS does "
                              f"not name ({', '.join(names.values()) or 'none'})",
                              "spell the name as in PEERS, or remove the line")
        keys[names[name.lower()]] = key
    return keys


def parse_timeouts(raw: str, source: str, peers: tuple[tuple[str, str], ...]
                   ) -> dict[str, float]:
    """`SECONDS` for every peer, then `NAME=SECONDS` for one (`300,gpu=900`): by peer name,
    the default under ''."""
    names = {name.lower(): name for name, _url in peers}
    found: dict[str, float] = {}
    hint = ("write PEER_TIMEOUT as seconds for every peer, then NAME=SECONDS for one, comma "
            "separated, e.g. PEER_TIMEOUT=300,gpu=900 (0 = no limit)")
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, equals, seconds = (s.strip() for s in part.rpartition("="))
        where = f"PEER_TIMEOUT (from {source}): {part!r}"
        if equals and name.lower() not in names:
            raise ConfigError(f"{where} is for {name!r}, which PEERS does not name "
                              f"({', '.join(names.values()) or 'none'})",
                              "spell the name as in PEERS, or remove it from PEER_TIMEOUT")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if not 0 <= value < 10**7:
            raise ConfigError(f"{where}: {seconds!r} is not a number of seconds", hint)
        key = names[name.lower()] if equals else ""
        if key in found:
            raise ConfigError(f"PEER_TIMEOUT (from {source}) gives "
                              f"{'the peer ' + repr(key) if key else 'the default'} twice", hint)
        found[key] = value
    return found


def build_peers(raw: str, source: str, model_prefix: str, keys_file: Path,
                keys_source: str, timeouts: str = "", timeouts_source: str = "the defaults"
                ) -> tuple[Peer, ...]:
    pairs = parse_peers(raw, source, model_prefix)
    if not pairs:
        return ()
    keys = read_peer_keys(keys_file, keys_source, pairs)
    seconds = parse_timeouts(timeouts, timeouts_source, pairs)
    default = seconds.get("", Peer.timeout)
    return tuple(Peer(name, url, keys.get(name, ""), seconds.get(name, default))
                 for name, url in pairs)
