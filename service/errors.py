"""The exception hierarchy used at the service's boundaries.

Network outcomes are *values* (see :class:`service.sender.SendStatus`), not exceptions.
"""


class GatewayError(Exception):
    """Base class of every error the service raises on purpose."""


class ConfigError(GatewayError):
    """A configuration value is missing or invalid; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key {key!r}: {message}")
        self.key = key


class InputError(GatewayError):
    """An input file or folder cannot be used; the message is the recorded reason."""


class TransientError(GatewayError):
    """A condition that may pass by itself (an I/O error, a mount that is away, a locked
    file, a full disk): the study waits and is tried again, it never fails for it."""


class ModelError(GatewayError):
    """A model failed to load or to run on a study."""


class ModelNotReady(ModelError):
    """A model cannot run yet (e.g. weights missing); studies wait instead of failing."""


class OutputError(GatewayError):
    """An output object could not be built, validated or written."""
