"""model_serve: many local GGUF models behind one OpenAI-compatible port."""

from model_serve import machine as _machine

__version__ = "0.1.0"

if _machine.portable():  # every process of the stack imports this first
    _machine.install_guard()
