"""Which chat template a model is served with, and why (`model show` says both).

llama-server uses the GGUF's own Jinja template. Without one it falls back to ChatML whatever
the architecture, and a Gemma or Llama model then answers with `<|im_start|>` in its replies.
So a GGUF without a template gets llama.cpp's built-in one for its family: `--chat-template
NAME` with Jinja off (with Jinja on, llama-server reads the name as a template's text).

Precedence, highest first (the README's "Chat templates" says the same):
sampler_args (`--chat-template`, `--chat-template-file`, `--jinja`), chat_template_file,
chat_template (a built-in, by name), the GGUF's own template, the family's built-in, ChatML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model_serve.errors import ConfigError
from model_serve.models.kinds import CHAT, described
from model_serve.models.model_info import ModelInfo

# Built-in templates for GGUFs without a template of their own, by architecture: only
# families whose chat format does not depend on the fine-tune. Names from llama.cpp's list
# (src/llama-chat.cpp); one an older llama-server lacks is left out when its config is written.
BY_ARCHITECTURE: dict[str, str] = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "llama4": "llama4", "phi3": "phi3", "command-r": "command-r", "cohere2": "command-r",
    "granite": "granite", "granitemoe": "granite", "exaone": "exaone3", "exaone4": "exaone4",
    "glm4": "chatglm4", "minicpm": "minicpm", "rwkv6": "rwkv-world", "rwkv7": "rwkv-world",
    "orion": "orion", "hunyuan-moe": "hunyuan-moe", "hunyuan-dense": "hunyuan-dense",
    "bailingmoe": "bailing", "seed_oss": "seed_oss", "gpt-oss": "gpt-oss",
    "qwen2": "chatml", "qwen2moe": "chatml", "qwen3": "chatml", "qwen3moe": "chatml",
}
# `llama` covers Llama 2, Llama 3, Mistral and many fine-tunes: only Llama 3's vocabulary
# tells which format a base model was trained next to.
LLAMA3_VOCABULARY = "llama-bpe"
# What sampler_args may say about templates: then they decide.
_SAMPLER_TEMPLATE_OPTIONS = ("chat-template", "chat-template-file", "jinja", "no-jinja")


@dataclass
class TemplateChoice:
    template: str  # what `model show` prints: a name, a file, "the GGUF's own", "none"
    reason: str
    options: dict[str, str] = field(default_factory=dict)  # llama-server options to add
    by_user: bool = False  # named in custom_models.yaml (else chosen by model_serve)


def builtin_for(info: ModelInfo) -> str:
    """llama.cpp's built-in template for the model's family, or ''."""
    if info.architecture == "llama" and info.tokenizer_pre == LLAMA3_VOCABULARY:
        return "llama3"
    return BY_ARCHITECTURE.get(info.architecture, "")


def choose(info: ModelInfo, kind: str, *, name: str | None, file: str | None,
           jinja: bool | None, sampler: dict[str, str], where: str) -> TemplateChoice:
    """The template, by the precedence in the module docstring. `where`: the
    custom_models.yaml entry (file:line) the settings came from."""
    said = [o for o in _SAMPLER_TEMPLATE_OPTIONS if o in sampler]
    if said:
        value = sampler.get("chat-template") or sampler.get("chat-template-file") or ""
        return TemplateChoice(value or ("Jinja" if "jinja" in said else "not Jinja"),
                              f"sampler_args --{said[0]} from {where} (they come first)",
                              by_user=True)
    if name and file:
        raise ConfigError(f"{where}: chat_template and chat_template_file both name a template",
                          "keep one: chat_template for a built-in by name, chat_template_file "
                          "for a Jinja file")
    if file:
        return TemplateChoice(file, f"chat_template_file from {where}", by_user=True)
    if name:
        if jinja:
            raise ConfigError(f"{where}: chat_template '{name}' is a built-in template, which "
                              "llama-server does not read with jinja: true",
                              "remove 'jinja: true', or give a Jinja file as chat_template_file")
        return TemplateChoice(name, f"chat_template from {where} (built-in, Jinja off)",
                              {"jinja": "false", "chat-template": name}, by_user=True)
    if kind != CHAT:
        return TemplateChoice("none", f"{described(kind)} does not chat")
    if info.has_chat_template:
        how = (f"; jinja: false in {where}: llama-server matches it to a built-in"
               if jinja is False else "")
        return TemplateChoice("the GGUF's own", f"tokenizer.chat_template in the GGUF{how}")
    if jinja:
        return TemplateChoice("chatml", f"the GGUF has none and jinja: true is set in {where}: "
                              "llama-server falls back to ChatML")
    builtin = builtin_for(info)
    if builtin:
        return TemplateChoice(builtin, f"the GGUF has none; llama.cpp's built-in for "
                              f"architecture {info.architecture}",
                              {"jinja": "false", "chat-template": builtin})
    return TemplateChoice("chatml", f"the GGUF has none and no built-in fits architecture "
                          f"{info.architecture or '?'}: llama-server falls back to ChatML; set "
                          "chat_template in custom_models.yaml to pick one")
