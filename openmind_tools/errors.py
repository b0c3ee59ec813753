"""Errors of openmind-tools, in a small hierarchy that also subclasses the builtins.

A converter catches `InputError` per volume and writes it to errors.parquet; a `MachineError` stops the
run without blaming the input; anything else is a bug and stops the run. Every message names the file
(or volume id) and the reason.
"""


class OpenMindError(Exception):
    """Base of every error this package raises on purpose."""


class InputError(OpenMindError, ValueError):
    """A source image (or its masks / CSV row) that cannot be converted; recorded, never fatal."""


class StoreError(OpenMindError, OSError):
    """A stored sample that is missing, unreadable or does not match the manifest."""


class ConfigError(OpenMindError, ValueError):
    """A setting, preset or query that cannot be honoured; raised before any work starts."""


class MachineError(OpenMindError, OSError):
    """The machine failed, not the input: disk full, I/O error, too many open files, a lost dask worker.

    Nothing is recorded against the input; the message says what to free or fix, and a rerun resumes.
    """
