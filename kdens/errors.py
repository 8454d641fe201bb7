"""Errors kdens raises for bad input or missing artifacts.

Library code raises these; only ``kdens/cli.py`` turns them into one-line click
errors with exit code 2. Every message names the offending value and the fix.
"""

from __future__ import annotations


class KdensError(Exception):
    """Base class: a problem the user can fix (bad input, missing files)."""


class ConfigError(KdensError, ValueError):
    """A config value or flag is invalid."""


class DataError(KdensError):
    """A dataset path or file is missing, corrupt or inconsistent."""


class ModelError(KdensError):
    """An unknown model name, bad model argument or unloadable model."""


class ArtifactError(KdensError):
    """A run folder is missing, unfinished or inconsistent."""


class TrainingError(KdensError):
    """Training diverged (NaN/inf loss) or cannot continue."""


class GateFailed(KdensError):
    """A deploy gate (latency, accuracy) was missed; the artifact is kept. Exit code 1."""
