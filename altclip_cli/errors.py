"""Typed errors raised by the library; the CLI turns them into `error:`/`hint:` lines and exit codes."""


class AltclipError(Exception):
    """Base class: a message for people, and an optional hint saying what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class ModelError(AltclipError):
    """The model folder, its config or its weights are unusable."""


class ConfigError(ModelError):
    """config.json is missing, malformed, or disagrees with the tensors."""


class CheckpointError(ModelError):
    """The weights cannot be read, or their keys do not match the model."""


class DownloadError(AltclipError):
    """A model could not be fetched (unknown id, network, offline with nothing cached)."""


class DeviceError(AltclipError):
    """An explicitly requested device or precision is not available."""


class InputError(AltclipError):
    """One input (an image, a text line) cannot be used; the run goes on with the others."""
