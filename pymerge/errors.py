"""Errors pymerge raises on bad input.

Every user-facing failure is a subclass of ``PymergeError`` whose message names the
file / tensor / key at fault and what was expected. The CLI prints ``error: <message>``
for these and exits non-zero without a traceback (unless ``-v``).
"""


class PymergeError(Exception):
    """Base class of every error pymerge reports to users."""


class CheckpointError(PymergeError):
    """A checkpoint file or directory is malformed, unsafe or incompatible."""


class ConfigError(PymergeError):
    """The merge configuration is invalid (unknown key, impossible combination...)."""


class BackendUnavailable(PymergeError):
    """An explicitly requested backend (or native kernel) cannot be used here."""


class MergeError(PymergeError):
    """The merge itself cannot proceed (shape mismatch, missing tensor, ...)."""
