"""The errors a user can cause, in one leaf module (it imports nothing from pretrain).

Every one derives from `PretrainError`, so the entry points and tools turn any of them into one
line on stderr and exit status 2, with no traceback. The message names the thing (the config
field, the file) and what to do.
"""

from __future__ import annotations


class PretrainError(Exception):
    """A user error: bad config, data, checkpoint or training state. The message says the fix."""


class ConfigError(PretrainError, ValueError):
    """A user error in the configuration; the message names the field and the fix."""


class DataError(PretrainError, ValueError):
    """A user error in the data: the message names the file or thing and the fix."""


class CheckpointError(PretrainError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


class NonFiniteError(PretrainError, RuntimeError):
    """Training produced a non-finite loss or gradient norm and the policy says halt."""
