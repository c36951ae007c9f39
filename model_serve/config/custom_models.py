"""custom_models.yaml: per-model settings, validated with the file and line of every mistake.

    models:
      gemma3:27.4b-q8_0:          # the served name without MODEL_PREFIX (dash form works too)
        sampler_args: "--temp 1.0 --top-p 0.95 --top-k 64"
        ctx_size: 32768
      gemma-creative:             # a second entry on the same file, with other settings
        base_model: gemma3:27.4b-q8_0
        sampler_args: "--temp 1.2"
      big-model:
        rpc: [192.168.1.20:50052, 192.168.1.21:50052]   # its layers on these workers
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_serve.errors import ConfigError


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    help: str


FIELDS: dict[str, Field] = {
    "sampler_args": Field(str, "extra llama-server arguments, e.g. \"--temp 0.7 --min-p 0.05\""),
    "ctx_size": Field(int, "context size in tokens (capped at the model's trained context)"),
    "ttl": Field(int, "idle seconds before unloading (0 = never)"),
    "cmd": Field(str, "full command for llama-swap, with ${MODEL_PATH} and ${PORT}"),
    "base_model": Field(str, "serve this entry as another name on that model's file"),
    "aliases": Field(list, "extra names a request may use"),
    "jinja": Field(bool, "use the GGUF's Jinja chat template (true/false)"),
    "mmproj": Field(str, "path of a vision projector GGUF"),
    "chat_template": Field(str, "one of llama.cpp's built-in chat templates by name, e.g. "
                           "gemma, llama3, chatml (see 'llama-server --help')"),
    "chat_template_file": Field(str, "path of a Jinja chat template file"),
    "chat_template_kwargs": Field(str, "JSON object passed to the chat template"),
    "parallel": Field(int, "parallel request slots"),
    "embeddings": Field(bool, "serve /v1/embeddings (a chat model then answers both; "
                        "embedding models have it on)"),
    "reranking": Field(bool, "serve /v1/rerank (rerankers have it on)"),
    "swa_full": Field(bool, "full KV cache for sliding-window layers (--swa-full): more "
                      "memory, and a saved conversation can be restored"),
    "rpc": Field(list, "workers ('model worker start') that hold the model's layers, as a list "
                 "of host:port, e.g. [192.168.1.20:50052, 192.168.1.21:50052]"),
}


# In a name, these would end or split it in an engine config: '[' and ']' a models.ini section
# name, ';' and '#' start a comment there, ',' separates its aliases.
_NAME_BREAKERS = re.compile(r"[\[\];#,]")
NAME_FIX = ("rename it in custom_models.yaml; letters, digits and . _ - : / @ + are always safe "
            "(e.g. my-model:7b-q4)")


def name_problem(name: str) -> str:
    """Why `name` cannot be a served name or alias, or '' when it can. Names become models.ini
    section names and alias lists, llama-swap ids and command-line words: a line break in one
    would start a line of its own (`model = ...`) in the file."""
    if not name:
        return "is empty"
    if len(f".{name}.".splitlines()) > 1:
        return "holds a line break"
    if not name.isprintable():
        return "holds a control character"
    found = _NAME_BREAKERS.search(name)
    if found:
        return f"holds '{found.group()}'"
    return ""


def check_names(names: list[str], where: str, config: str) -> None:
    """Refuse, before anything is written, a name `config` (an engine's file) cannot carry:
    one that came past load_custom_models (MODEL_PREFIX, names.json, a bug) is stopped here."""
    for name in names:
        problem = name_problem(name)
        if problem:
            raise ConfigError(f"{where}: the served name or alias {name!r} {problem}, which "
                              f"{config} cannot carry", f"the last good config stays; {NAME_FIX}")


@dataclass
class CustomEntry:
    key: str
    line: int
    settings: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.settings.get(name, default)


@dataclass
class CustomModels:
    path: Path
    entries: dict[str, CustomEntry]

    def where(self, entry: CustomEntry) -> str:
        return f"{self.path}:{entry.line}"


def _scalar_value(node: Any, where: str, name: str) -> Any:
    import yaml

    if not isinstance(node, yaml.ScalarNode):
        # One level of list (aliases): nothing deeper, so no alias-of-alias blow-up either.
        if isinstance(node, yaml.SequenceNode) and all(
                isinstance(item, yaml.ScalarNode) for item in node.value):
            return [_scalar_value(item, where, name) for item in node.value]
        raise ConfigError(f"{where}: '{name}' must be a single value",
                          f"{name}: {FIELDS[name].help}")
    if node.tag == "tag:yaml.org,2002:str":
        return node.value
    return yaml.safe_load(yaml.serialize(node))  # resolves ints, bools and nulls as YAML does


def _check_type(name: str, value: Any, where: str) -> Any:
    spec = FIELDS[name]
    if spec.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: '{name}' must be a whole number, not {value!r}",
                          f"{name}: {spec.help}")
    if spec.kind is int and value < 0:
        raise ConfigError(f"{where}: '{name}' cannot be negative", f"{name}: {spec.help}")
    if spec.kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: '{name}' must be true or false, not {value!r}",
                          f"{name}: {spec.help}")
    if spec.kind is str and not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where}: '{name}' must be text, not {value!r}", f"{name}: {spec.help}")
    if spec.kind is str:
        value = str(value)
    if spec.kind is list:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) and v.strip() for v in items):
            raise ConfigError(f"{where}: '{name}' must be a list of names", f"{name}: {spec.help}")
        value = [v.strip() for v in items]
        for alias in value:
            problem = name_problem(alias)
            if problem:
                raise ConfigError(f"{where}: the alias {alias!r} {problem}, which engine configs "
                                  "cannot carry", f"give it another name: {NAME_FIX}")
    if name == "sampler_args":
        try:
            shlex.split(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: sampler_args cannot be split into arguments: {exc}",
                              "close the quote in sampler_args") from exc
    return value


# Only comments, blank lines and at most an empty 'models:' (the file as the checkout has it).
_NOTHING_SET = re.compile(r"(?:[ \t]*(?:#[^\n]*)?\n)*(?:models:[ \t]*(?:#[^\n]*)?(?:\n|$))?"
                          r"(?:[ \t]*(?:#[^\n]*)?(?:\n|$))*")


def load_custom_models(path: Path) -> CustomModels:
    """Parse and type-check the file. A missing file is an empty one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return CustomModels(path, {})
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}",
                          "fix the file's permissions or encoding") from exc
    if _NOTHING_SET.fullmatch(text):
        return CustomModels(path, {})  # comments and an empty 'models:': no YAML parser needed
    import yaml

    try:
        root = yaml.compose(text)
    except RecursionError as exc:  # PyYAML composes nested nodes recursively
        raise ConfigError(f"{path}: nested too deeply to read",
                          "custom_models.yaml needs two levels: models, then one entry each") \
            from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}",
                          "fix the YAML; the engine keeps its last good config meanwhile") from exc
    if root is None:
        return CustomModels(path, {})
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:1: expected a mapping with a 'models:' key",
                          "start the file with 'models:' and indent one entry per model")
    models_node = None
    for key_node, value_node in root.value:
        if key_node.value != "models":
            raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: unknown top-level key "
                              f"'{key_node.value}'", "the only top-level key is 'models:'")
        models_node = value_node
    entries: dict[str, CustomEntry] = {}
    if models_node is None or (isinstance(models_node, yaml.ScalarNode) and not models_node.value):
        return CustomModels(path, entries)
    if not isinstance(models_node, yaml.MappingNode):
        raise ConfigError(f"{path}:{models_node.start_mark.line + 1}: 'models' must be a mapping",
                          "indent one 'name:' entry per model under 'models:'")
    for key_node, value_node in models_node.value:
        line = key_node.start_mark.line + 1
        where = f"{path}:{line}"
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(f"{where}: a model name must be text", NAME_FIX)
        key = str(key_node.value).strip()
        problem = name_problem(key)
        if problem:
            raise ConfigError(f"{where}: the model name {key!r} {problem}, which engine configs "
                              "cannot carry (it would break models.ini or config.yaml)",
                              f"the entry is not used and the last good config stays; {NAME_FIX}")
        if key in entries:
            raise ConfigError(f"{where}: model '{key}' is listed twice (first at line "
                              f"{entries[key].line})", "merge the two entries into one")
        entry = CustomEntry(key, line)
        entries[key] = entry
        if isinstance(value_node, yaml.ScalarNode) and value_node.value in ("", "~", "null"):
            continue  # an empty entry is allowed
        if not isinstance(value_node, yaml.MappingNode):
            raise ConfigError(f"{where}: settings of '{key}' must be a mapping",
                              "indent settings like 'ctx_size: 8192' under the model's name")
        for field_node, field_value in value_node.value:
            name = str(field_node.value)
            field_where = f"{path}:{field_node.start_mark.line + 1}"
            if name not in FIELDS:
                import difflib

                near = difflib.get_close_matches(name, FIELDS, n=1)
                hint = f"did you mean '{near[0]}'?" if near else "valid keys: " + ", ".join(FIELDS)
                raise ConfigError(f"{field_where}: unknown key '{name}' for model '{key}'", hint)
            value = _scalar_value(field_value, field_where, name)
            if name == "rpc":
                entry.settings[name] = check_workers(value, field_where, key)
            else:
                entry.settings[name] = _check_type(name, value, field_where)
        if entry.get("rpc") and entry.get("cmd"):
            raise ConfigError(f"{where}: model '{key}' has both rpc and cmd; cmd is used as "
                              "written, so rpc would not reach it",
                              "remove cmd, or remove rpc and put --rpc HOST:PORT,... in cmd")
    return CustomModels(path, entries)


# llama.cpp's RPC client splits an endpoint at its first ':', so a host is a name or an IPv4
# address: an IPv6 address cannot be written there.
_WORKER = re.compile(r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(?P<port>[0-9]{1,5})")
_WORKER_FIX = ("write each worker as host:port, one list item each, e.g. "
               "rpc: [192.168.1.20:50052, 192.168.1.21:50052]")


def check_workers(value: Any, where: str, model: str) -> list[str]:
    """The model's RPC workers as llama-server's --rpc takes them, each one checked here: the
    list is joined with ',' into one option value, so a comma or space inside an item would
    add or break a worker."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(f"{where}: rpc of model '{model}' is an empty list",
                          f"remove rpc to serve the model on this machine alone; or "
                          f"{_WORKER_FIX}")
    workers: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{where}: rpc of model '{model}' holds {item!r}, not host:port",
                              _WORKER_FIX)
        worker = item.strip()
        if "," in worker or any(c.isspace() for c in worker):
            raise ConfigError(f"{where}: rpc of model '{model}' holds {item!r}: a comma or "
                              "space inside one worker", _WORKER_FIX)
        match = _WORKER.fullmatch(worker)
        if match is None:
            ipv6 = " (an IPv6 address cannot be given: use a host name)" \
                if worker.count(":") > 1 else ""
            raise ConfigError(f"{where}: rpc of model '{model}' holds {item!r}, which is not "
                              f"host:port{ipv6}", _WORKER_FIX)
        port = int(match["port"])
        if not 1 <= port <= 65535:
            raise ConfigError(f"{where}: rpc of model '{model}': the port of {worker!r} is "
                              "not between 1 and 65535",
                              "give the port the worker listens on ('model worker status' "
                              "on it shows it)")
        worker = f"{match['host'].lower()}:{port}"
        if worker in workers:
            raise ConfigError(f"{where}: rpc of model '{model}' lists {worker} twice",
                              "list each worker once")
        workers.append(worker)
    return workers


def sampler_options(args: str) -> dict[str, str]:
    """'--temp 0.7 --jinja -n 128' -> {'temp': '0.7', 'jinja': 'true', 'n': '128'}."""
    tokens = shlex.split(args)
    options: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("-") or token in ("-", "--"):
            raise ConfigError(f"sampler_args: '{token}' is not an option",
                              "write options as '--name value', e.g. '--temp 0.7'")
        name = token.lstrip("-")
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not _is_option(tokens[i + 1]):
            value = tokens[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        options[name] = value
    return options


def _is_option(token: str) -> bool:
    if not token.startswith("-"):
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False  # a negative number is a value
