"""Exceptions raised by vecsim.

Every error subclasses a built-in (so ``except KeyError`` keeps working) and
:class:`VecsimError`, which the CLI turns into one line and an exit code.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class VecsimError(Exception):
    """Base of every error vecsim raises on purpose (bad input, bad store)."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else self.__class__.__name__


class UnknownLayerError(VecsimError, KeyError):
    pass


class UnknownModelError(VecsimError, ValueError):
    pass


class UnknownWeightsError(VecsimError, ValueError):
    pass


class UnknownStimulusError(VecsimError, KeyError):
    pass


class DimensionMismatchError(VecsimError, ValueError):
    pass


class StimulusSetError(VecsimError, ValueError):
    """A stimulus folder or manifest that cannot be used (missing, empty, bad columns)."""


class ImageDecodeError(VecsimError, ValueError):
    pass


class StoreExistsError(VecsimError, FileExistsError):
    pass


class StoreError(VecsimError, RuntimeError):
    """A store that is missing, damaged, of another format version or otherwise unusable."""


class StoreLockedError(VecsimError, RuntimeError):
    pass


class ConfigError(VecsimError, ValueError):
    pass


class CheckpointError(VecsimError, ValueError):
    pass


class MissingExtraError(VecsimError, ImportError):
    """An optional library (an extra of vecsim's) that a requested feature needs is not installed."""


class DeviceError(VecsimError, RuntimeError):
    pass


class QueryError(VecsimError, ValueError):
    pass


class DiskSpaceError(VecsimError, OSError):
    pass


class OutputExistsError(VecsimError, FileExistsError):
    pass


def close_matches(name: str, choices: Iterable[str], n: int = 5) -> str:
    """A short 'did you mean' phrase for an error message ('' when nothing is close)."""
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not found:
        found = [c for c in choices if name.lower() in c.lower()][:n]
    return f"; did you mean: {', '.join(found)}" if found else ""
