"""model_serve: many local GGUF models behind one OpenAI-compatible port."""

__version__ = "0.1.0"
