"""User-facing errors.

Every problem a user can fix (a missing file, a wrong column, an impossible batch size)
is raised as a ``DetoxError`` whose message names the problem and the fix. The CLI prints
the message as one paragraph and exits with status 2, without a traceback.
"""

from __future__ import annotations


class DetoxError(Exception):
    """A problem with the user's input or environment, explained in plain words."""


class ConfigError(DetoxError):
    """An invalid or inconsistent configuration value."""


class DataError(DetoxError):
    """A dataset that cannot be read or turned into prompts."""


class ModelLoadError(DetoxError):
    """A model, tokenizer or adapter that cannot be found or loaded."""


class TrainingDiverged(DetoxError):
    """Training produced only non-finite values for too many consecutive steps."""
