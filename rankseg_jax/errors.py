"""The exceptions that mean "the user's input is wrong" (main.py prints one line, exit status 2).

Every user-facing error subclasses `UserError`; main.py catches that one class in one place.
This module imports nothing from the package, so any module can raise these without a cycle.
The messages are one line that names the file or config key and the problem.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by the user's input (config, data, weights, environment)."""


class ConfigError(UserError, ValueError):
    """A config value or key that cannot work (also mesh/resume/export settings); names the key."""


class InputError(UserError, ValueError):
    """An array or argument passed to the API that cannot be used (shape, dtype, range)."""


class DatasetError(UserError, ValueError):
    """A dataset problem (layout, label kind or values, sizes); names the path and the problem."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A root, split folder, split list, image or label file that is not where the layout says."""


class CorruptDataError(DatasetError):
    """An image, label or record that cannot be read or decoded (`data.skip_corrupt` skips it)."""


class CheckpointError(UserError, ValueError):
    """A weights file or checkpoint that cannot be read or does not fit the model/pipeline."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint or weights file where one was asked for."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks for a global outside the allow-list (loading it could run code)."""
