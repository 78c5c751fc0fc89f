"""Errors a user can cause and fix. The CLI prints these as one line, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in input, configuration or arguments; the message says what to change."""

    exit_code = 2


class ConfigError(UserError):
    """Configuration that does not validate: unknown key, wrong type, bad value."""


class InputError(UserError):
    """Input data or paths that cannot be used (missing landing folder, no events, ...)."""


class GateError(Exception):
    """A data-quality or model-quality gate failed: the run stops before publishing."""

    exit_code = 3


class TrainingProcessError(RuntimeError):
    """A distributed training process crashed or exited non-zero: a failure of the run, not of
    its input. The message is one line naming the rank and its exit status or signal."""

    def __init__(self, message: str, *, rank: int | None, returncode: int) -> None:
        super().__init__(message)
        self.rank = rank  # None when torchrun failed before naming a rank
        self.returncode = returncode  # as subprocess reports it: -N for signal N
