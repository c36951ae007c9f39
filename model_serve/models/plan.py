"""The serving plan: catalog + custom_models.yaml + settings -> what each served name runs.

Both engine config writers render this plan, so every rule (context size, TTL, sampler
arguments, aliases) is decided once, here, with the reason recorded for `model show`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from model_serve import machine
from model_serve.config.custom_models import CustomEntry, CustomModels, sampler_options
from model_serve.config.settings import Settings
from model_serve.errors import ConfigError
from model_serve.models import chat_templates, footprint, kinds
from model_serve.models.catalog import Catalog, CatalogModel, ScanProblem
from model_serve.models.chat_templates import TemplateChoice
from model_serve.models.names import dash_form, identity

log = logging.getLogger(__name__)

# Ollama PARAMETER defaults that map onto llama-server options (custom sampler_args win).
_OLLAMA_PARAMS = {
    "temperature": "temp", "top_k": "top-k", "top_p": "top-p", "min_p": "min-p",
    "repeat_penalty": "repeat-penalty", "repeat_last_n": "repeat-last-n",
    "presence_penalty": "presence-penalty", "frequency_penalty": "frequency-penalty",
}


@dataclass
class ServedModel:
    name: str  # the served name (colon form)
    aliases: list[str]
    model: CatalogModel
    ctx_size: int
    ctx_reason: str
    ttl: int
    parallel: int
    options: dict[str, str] = field(default_factory=dict)  # llama-server long option -> value
    cmd: str | None = None  # llama-swap only: a full command override
    custom_line: str = ""  # where its custom settings came from
    keeps_conversations: bool = False  # KV_CACHE: slots saved before unload, restored after
    conversations_reason: str = ""
    kind: str = kinds.CHAT  # chat, embedding or rerank (models/kinds.py)
    kind_reason: str = ""
    chat_template: TemplateChoice | None = None
    workers: list[str] = field(default_factory=list)  # rpc: host:port of its RPC servers

    @property
    def embeddings(self) -> bool:
        """Whether it answers /v1/embeddings (options may come from sampler_args too)."""
        return any(self.options.get(o) == "true" for o in ("embeddings", "embedding"))

    @property
    def reranking(self) -> bool:
        return any(self.options.get(o) == "true" for o in ("reranking", "rerank"))

    @property
    def path(self) -> Path:
        return self.model.path

    @property
    def estimated_bytes(self) -> int:
        """What loading it takes of this machine's memory: with RPC workers, the local share."""
        mmproj = _file_size(self.options.get("mmproj"))
        full = footprint.estimate(self.model.info, self.model.size_bytes, self.ctx_size,
                                  self.parallel, mmproj, swa_full=self.swa_full)
        if not self.workers:
            return full.total
        return footprint.local_share(self.model.info, full, len(self.workers), mmproj,
                                     _local_gpu()).total

    @property
    def swa_full(self) -> bool:
        return self.options.get("swa-full") == "true"


@functools.cache
def _local_gpu() -> bool:
    """Whether this machine's llama.cpp has a GPU that takes layers beside RPC workers: Metal on
    Apple Silicon (./install.sh builds llama.cpp for the CPU elsewhere)."""
    from model_serve.machine_code import this_machine

    return this_machine().apple_silicon


def _file_size(path: str | None) -> int:
    try:
        return Path(path).stat().st_size if path else 0
    except OSError:
        return 0


def _memory_budget(settings: Settings) -> int:
    return int(machine.physical_memory() * settings.memory_pressure_threshold // 100)


def _choose_ctx(model: CatalogModel, wanted: int, source: str, parallel: int,
                budget: int, swa_full: bool) -> tuple[int, str]:
    trained = model.info.context_length
    ctx, reason = wanted, source
    if trained and ctx > trained:
        ctx, reason = trained, f"{source} {wanted} capped at the model's trained context {trained}"
    fitted = footprint.largest_fitting_ctx(model.info, model.size_bytes, ctx, budget, parallel,
                                           swa_full=swa_full)
    if fitted < ctx:
        gib = budget / 2**30
        reason = f"{reason}; reduced from {ctx} so weights + KV cache fit {gib:.1f} GiB"
        ctx = fitted
    return ctx, reason


def _rpc_ctx(model: CatalogModel, wanted: int, source: str) -> tuple[int, str]:
    """A model on RPC workers keeps its KV cache there, in memory this machine cannot see: its
    context is capped at the trained one only, not fitted to the local budget."""
    trained = model.info.context_length
    if trained and wanted > trained:
        return trained, f"{source} capped at the model's trained context {trained}"
    return wanted, f"{source} (not fitted to this machine's memory: its layers and KV " \
        "cache are on the RPC workers)"


def _served(model: CatalogModel, name: str, entry: CustomEntry | None, custom: CustomModels,
            settings: Settings, budget: int) -> ServedModel:
    get = entry.get if entry else (lambda _k, d=None: d)
    where = custom.where(entry) if entry else ""
    parallel = get("parallel", settings.default_parallel) or 1
    if get("ctx_size") is not None:
        wanted, source = get("ctx_size"), f"ctx_size {get('ctx_size')} from {where}"
    else:
        wanted, source = settings.default_ctx_size, f"DEFAULT_CTX_SIZE {settings.default_ctx_size}"
    options: dict[str, str] = {}
    for key, option in _OLLAMA_PARAMS.items():
        if key in model.params and isinstance(model.params[key], (int, float)):
            options[option] = str(model.params[key])
    mmproj = get("mmproj") or (str(model.mmproj) if model.mmproj else None)
    if mmproj:
        options["mmproj"] = mmproj
    if get("jinja") is not None:
        options["jinja"] = "true" if get("jinja") else "false"
    elif model.info.has_chat_template:
        options["jinja"] = "true"
    if get("chat_template_file"):
        options["chat-template-file"] = get("chat_template_file")
    if get("chat_template_kwargs"):
        options["chat-template-kwargs"] = get("chat_template_kwargs")
    try:
        sampler = sampler_options(get("sampler_args")) if get("sampler_args") else {}
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}", exc.hint) from exc
    kind, kind_reason = kinds.kind_of(model.info)
    options.update(_kind_options(model, kind, get("embeddings"), get("reranking")))
    template = chat_templates.choose(
        model.info, kind, name=get("chat_template"), file=get("chat_template_file"),
        jinja=get("jinja"), sampler=sampler, where=where or "custom_models.yaml")
    options.update(template.options)
    if "rpc" in sampler:
        raise ConfigError(f"{where}: sampler_args of {name} sets --rpc",
                          "list the workers as rpc: [host:port, ...] in the model's entry "
                          "instead, so admission and 'model show' know them")
    options.update(sampler)  # they come last: llama-server's own words win
    if get("swa_full") is not None:  # llama-server has no flag to turn it off: unset is off
        options.pop("swa-full", None)
        if get("swa_full"):
            options["swa-full"] = "true"
    elif settings.kv_cache_enabled and "swa-full" not in options and \
            footprint.swa_full_is_cheap(model.info, model.size_bytes, wanted, parallel):
        options["swa-full"] = "true"  # a restored cache is reused only with it
    if settings.model_threads and not {"threads", "t"} & options.keys():
        options["threads"] = str(settings.model_threads)
    workers = list(get("rpc") or [])
    if workers:
        options["rpc"] = ",".join(workers)
        ctx, reason = _rpc_ctx(model, wanted, source)
    else:
        ctx, reason = _choose_ctx(model, wanted, source, parallel, budget,
                                  options.get("swa-full") == "true")
    if kind != kinds.CHAT and not {"ubatch-size", "ub", "batch-size", "b"} & options.keys():
        # llama-server embeds or scores an input in one batch of at most --ubatch-size tokens
        # (512 unless said): a longer input failed with HTTP 500. An encoder's batch is small.
        options["batch-size"] = options["ubatch-size"] = str(ctx // parallel)
    aliases = [] if entry is None else list(get("aliases", []))
    keeps, why = _conversations(settings, model, options, ctx, parallel, get("swa_full"))
    if keeps and get("cmd"):
        keeps, why = False, "cmd is set: model_serve does not add --slot-save-path to it"
    if keeps and kind != kinds.CHAT:
        keeps, why = False, f"{kinds.described(kind)} holds no conversation"
    return ServedModel(
        name=name, aliases=aliases, model=model, ctx_size=ctx, ctx_reason=reason,
        ttl=get("ttl", settings.model_ttl), parallel=parallel, options=options,
        cmd=get("cmd"), custom_line=where, keeps_conversations=keeps, conversations_reason=why,
        kind=kind, kind_reason=kind_reason, chat_template=template, workers=workers,
    )


def _kind_options(model: CatalogModel, kind: str, embeddings: bool | None,
                  reranking: bool | None) -> dict[str, str]:
    """--embeddings with a pooling, or --reranking: by the GGUF, or as custom_models.yaml says
    (`embeddings: true` on a chat model serves both: llama-server needs a pooling other than
    none for that, and mean is what chat models' embeddings are usually pooled by)."""
    options: dict[str, str] = {}
    if reranking if reranking is not None else kind == kinds.RERANK:
        options["reranking"] = "true"
    elif embeddings if embeddings is not None else kind == kinds.EMBEDDING:
        options["embeddings"] = "true"
        pooling = model.info.pooling
        options["pooling"] = pooling if pooling not in ("", "none", "rank") else \
            kinds.DEFAULT_POOLING
    return options


def _conversations(settings: Settings, model: CatalogModel, options: dict[str, str], ctx: int,
                   parallel: int, swa_full_set: bool | None) -> tuple[bool, str]:
    """Whether a restored KV cache can be reused by this model, and why (`model show`)."""
    if settings.kv_cache != "on":
        return False, "KV_CACHE=off"
    if not settings.front_enabled:
        return False, "FRONT=off (the front saves and restores them)"
    info = model.info
    if info.recurrent:
        return False, (f"{info.architecture} keeps a recurrent state: llama-server does not "
                       "reuse a restored cache for it")
    extra = footprint.swa_full_extra(info, ctx, parallel)
    if extra and options.get("swa-full") != "true":
        cost = f"+{extra / 2**20:.0f} MiB"
        why = ("swa_full: false in custom_models.yaml" if swa_full_set is False else
               f"its cost ({cost}) is over {footprint.SWA_FULL_FREE // 2**20} MiB and "
               f"{footprint.SWA_FULL_SHARE:.0%} of the model")
        return False, ("sliding-window attention without --swa-full, so a restored cache "
                       f"would not be reused ({why}); set swa_full: true for {cost}")
    if extra:
        return True, (f"saved before unload, restored at the next load (--swa-full on, "
                      f"+{extra / 2**20:.0f} MiB)")
    return True, "saved before unload, restored at the next load"


def _match_entry(key: str, catalog: Catalog, custom: CustomModels,
                 entry: CustomEntry) -> CatalogModel | None:
    """The model an entry is about. An entry for a model that is not there (removed, not
    pulled yet, a typo) is reported, not fatal: models come and go, settings stay."""
    model = catalog.find(key)
    if model is not None:
        return model
    choices = [m.key for m in catalog.models]
    import difflib

    near = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    hint = f"did you mean '{near[0]}'?" if near else "run 'model list' to see the names"
    catalog.problems.append(ScanProblem(
        custom.path, f"line {entry.line}: model '{key}' matches no model in MODELS_DIR, so "
        f"its settings are not used ({hint})"))
    return None


def build_plan(catalog: Catalog, custom: CustomModels, settings: Settings,
               budget: int | None = None,
               routes: Callable[[ServedModel], list[str]] | None = None) -> list[ServedModel]:
    """Every served name with its resolved settings, sorted by name. `routes` gives the names
    the engine will route to a model (Engine.routed_names); they must reach one model only."""
    budget = _memory_budget(settings) if budget is None else budget
    prefix = settings.model_prefix
    by_model: dict[str, CustomEntry] = {}
    extras: list[tuple[CustomEntry, CatalogModel]] = []
    for key, entry in custom.entries.items():
        if entry.get("base_model"):
            base = _match_entry(entry.get("base_model"), catalog, custom, entry)
            if base is None:
                continue
            if catalog.find(key) is not None:
                raise ConfigError(f"{custom.where(entry)}: '{key}' has base_model but is already "
                                  "the name of a model", "give the new entry another name")
            extras.append((entry, base))
        elif (model := _match_entry(key, catalog, custom, entry)) is not None:
            by_model[model.name] = entry
    plan: list[ServedModel] = []
    wanted = [(model, model.name, by_model.get(model.name)) for model in catalog.models]
    wanted += [(base, prefix + entry.key, entry) for entry, base in extras]
    for model, name, entry in wanted:
        try:
            plan.append(_served(model, name, entry, custom, settings, budget))
        except ConfigError:
            raise  # the user's settings: the last good config stays until they are fixed
        except Exception as exc:  # noqa: BLE001 - one model's trouble is a warning on it
            log.debug("planning %s failed", name, exc_info=True)
            catalog.problems.append(ScanProblem(model.path, (
                f"not served: its settings could not be worked out ({type(exc).__name__}: "
                f"{str(exc)[:200]})")))
    _check_unique(plan, routes or (lambda served: [served.name, *served.aliases]))
    return sorted(plan, key=lambda s: s.name)


def find_served(plan: list[ServedModel], catalog: Catalog, name: str) -> ServedModel:
    """The served model a user means: served name, dash form, alias, unprefixed key, or an
    Ollama name (tag optional)."""
    from model_serve.models.ollama import resolve

    lowered = name.lower()
    for served in plan:
        names = [served.name, dash_form(served.name), *served.aliases, served.model.key]
        if lowered in (n.lower() for n in names):
            return served
    for match in resolve(catalog, name):
        for served in plan:
            if served.name == match.served:
                return served
    raise ConfigError(f"no model named '{name}'", "run 'model list' to see the names")


def _check_unique(plan: list[ServedModel], routes: Callable[[ServedModel], list[str]]) -> None:
    """Every name an engine routes points at one model (neither case nor ':' against '-'
    counts): the router would merge two sections silently, llama-swap refuses the file."""
    seen: dict[str, tuple[str, str]] = {}
    for served in plan:
        for name in routes(served):
            owner = seen.get(identity(name))
            if owner is not None and owner[0] != served.name:
                same = "" if owner[1] == name else f" ('{owner[1]}' and '{name}' differ only " \
                    "by case or ':' against '-', which engines treat as one name)"
                where = served.custom_line or owner[0]
                raise ConfigError(f"{where}: the name '{name}' is used by both '{owner[0]}' and "
                                  f"'{served.name}'{same}",
                                  "rename one alias in custom_models.yaml")
            seen[identity(name)] = (served.name, name)
