"""Errors kdens raises, and the exit code each maps to.

Library code raises these; only the command line (``kdens/app/cli.py``) turns them into
one line on stderr and an exit code, the same for every command, ``kdens run`` included:

- 0: everything passed.
- 1: a gate or training failure: a deploy budget or check was missed (``GateFailed``), or a
  run trained but learned nothing usable (``TrainingFailed``: diverged, units died, ended
  at chance). The input was fine; the result was not.
- 2: bad input (every other ``KdensError``): a value, path, file or folder the user must fix.

Every message names the offending value and the fix.
"""

from __future__ import annotations

from typing import Callable


class KdensError(Exception):
    """Base class: a problem the user can fix (bad input, missing files). Exit code 2."""


class ConfigError(KdensError, ValueError):
    """A config value or flag is invalid."""


class DataError(KdensError):
    """A dataset path or file is missing, corrupt or inconsistent."""


class ModelError(KdensError):
    """An unknown model name, bad model argument or unloadable model."""


class ArtifactError(KdensError):
    """A run folder is missing, unfinished or inconsistent."""


class TrainingError(KdensError):
    """Training cannot start or continue on this input (e.g. a checkpoint from other settings)."""


def flag_setting(key: str, value) -> str:
    """``--grad-clip 5``: how a stage command spells a setting."""
    return f"--{key.replace('_', '-')} {value:g}" if isinstance(value, float) else f"--{key.replace('_', '-')} {value}"


class TrainingFailed(TrainingError):
    """A run trained but produced nothing usable (diverged, dead units, at chance). Exit code 1.

    ``who`` names the run (``student``, ``member-02``), ``what`` says what happened and
    ``why`` what the run's history suggests; ``changes`` are settings worth changing, as
    ``(key, suggested value)`` with ``key`` a config field (``lr``, ``grad_clip``), never one
    whose suggested value is already in force; ``alternatives`` are advice that is not a
    setting. How a setting is spelled and how to rerun depend on where the run was started,
    so the command line and ``kdens run`` each render the same failure with ``message()``.
    """

    def __init__(self, who: str, what: str, changes: list[tuple[str, object]] | None = None,
                 why: list[str] | None = None, alternatives: list[str] | None = None, text: str | None = None):
        self.who, self.what = who, what
        self.changes = list(changes or [])
        self.why = list(why or [])
        self.alternatives = list(alternatives or [])
        super().__init__(text or self.message())  # text: the failure already rendered for its context

    def message(self, setting: Callable[[str, object], str] = flag_setting, where: str = "",
                rerun: str = "then rerun the command with --force", who: str | None = None) -> str:
        """What happened and the advice: settings spelled by ``setting``, ``where`` they go, how to rerun."""
        text = f"{self.who if who is None else who}: {self.what}"
        if self.why:
            text += ". " + "; ".join(self.why)
        advice = []
        if self.changes:
            advice.append(" and ".join(setting(k, v) for k, v in self.changes) + (f" {where}" if where else ""))
        advice += self.alternatives
        if advice:
            text += ". Try " + "; or ".join(advice)
        return f"{text}; {rerun}"


class GateFailed(KdensError):
    """A deploy gate (latency, accuracy) was missed; the artifact is kept. Exit code 1."""
