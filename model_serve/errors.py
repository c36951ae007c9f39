"""One error family: every failure a user can fix carries a message and a hint."""

from __future__ import annotations

# Exit codes shared by every command (status follows the usual service codes).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_RUNNING = 3


class ModelServeError(Exception):
    """A failure with a user-facing message, an optional fix, and an exit code."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class ConfigError(ModelServeError):
    """Bad settings or a bad user file (.env, custom_models.yaml)."""

    exit_code = EXIT_BAD_INPUT


class NotRunningError(ModelServeError):
    """The stack is not running where a command needs it."""

    exit_code = EXIT_NOT_RUNNING


class EngineError(ModelServeError):
    """The engine binary is missing, failed to start, or answered badly."""
