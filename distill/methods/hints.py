"""Hints: reading a network's intermediate activations by module name, with forward hooks.

``--hint TEACHER:STUDENT`` (repeatable) pairs a point of the teacher with a point of the
student. A point is a module name as ``model.named_modules()`` spells it (``body``,
``features.3``), meaning that module's output, or ``NAME/in``, meaning its input. The
default, ``head/in:head/in``, is the last hidden layer of each network -- the input of the
output layer ``head`` that every registry model and every ``package.module:factory`` model
ends in (README: "whose last layer is an attribute head: nn.Linear").

``Tap`` registers the hooks and keeps what the named modules saw in the last forward pass,
with the autograd graph (the student's features are trained through it).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from kdens.errors import ConfigError, ModelError

DEFAULT_HINT = "head/in:head/in"
_IN = "/in"


@dataclass(frozen=True)
class Point:
    """One place in a network: a module's output, or its input."""

    module: str
    io: str = "output"

    def __str__(self) -> str:
        return self.module + (_IN if self.io == "input" else "")


@dataclass(frozen=True)
class Hint:
    """A teacher point and the student point that learns from it."""

    teacher: Point
    student: Point

    def __str__(self) -> str:
        return f"{self.teacher}:{self.student}"


def _point(text: str, spec: str) -> Point:
    text = text.strip()
    io = "output"
    if text.endswith(_IN):
        text, io = text[: -len(_IN)], "input"
    if not text or any(c.isspace() for c in text):
        raise ConfigError(f"--hint {spec!r}: each side must name a module (e.g. body, features.3, or head/in "
                          f"for the input of head); the default is {DEFAULT_HINT}")
    return Point(text, io)


def parse_hint(spec: str) -> Hint:
    """``TEACHER:STUDENT`` -> Hint; ConfigError naming the value and the form otherwise."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"--hint {spec!r} must look like TEACHER_MODULE:STUDENT_MODULE (e.g. body:body, "
                          f"or head/in:head/in for the inputs of head, the default)")
    t, s = spec.split(":")
    return Hint(_point(t, spec), _point(s, spec))


def parse_hints(specs) -> list[Hint]:
    """The ``--hint`` values (a string or a list), or the default when none is given."""
    if specs is None or isinstance(specs, str):
        specs = [specs] if specs else []
    hints = [parse_hint(s) for s in specs] or [parse_hint(DEFAULT_HINT)]
    if len({str(h) for h in hints}) != len(hints):
        raise ConfigError(f"--hint lists the same pair twice: {', '.join(map(str, hints))}")
    return hints


def module_names(model: nn.Module, limit: int = 24) -> str:
    """The model's module names for an error message (the first ``limit``)."""
    names = [n for n, _ in model.named_modules() if n]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class Tap:
    """Forward hooks on named points of one network; ``take()`` returns what they saw last."""

    def __init__(self, model: nn.Module, points: list[Point], who: str):
        modules = dict(model.named_modules())
        self.points, self.who = list(points), who
        self._seen: dict[int, Tensor] = {}
        self._handles = []
        for i, p in enumerate(self.points):
            m = modules.get(p.module) if p.module else None
            if m is None:
                raise ConfigError(f"--hint: the {who} has no module named {p.module!r}; its modules: "
                                  f"{module_names(model)} (append /in for a module's input)")
            if p.io == "input":
                self._handles.append(m.register_forward_pre_hook(self._keep_input(i)))
            else:
                self._handles.append(m.register_forward_hook(self._keep_output(i)))

    def _keep_input(self, i: int):
        def hook(module, args):
            self._store(i, args[0] if args else None)
        return hook

    def _keep_output(self, i: int):
        def hook(module, args, output):
            self._store(i, output[0] if isinstance(output, (tuple, list)) else output)
        return hook

    def _store(self, i: int, value) -> None:
        if not isinstance(value, Tensor):
            raise ModelError(f"--hint {self.points[i]}: the {self.who}'s module gives a "
                             f"{type(value).__name__}, not a tensor")
        self._seen[i] = value

    def take(self) -> list[Tensor]:
        """The tensors of the last forward pass, in the order of the points; cleared afterwards."""
        missing = [str(p) for i, p in enumerate(self.points) if i not in self._seen]
        if missing:
            raise ModelError(f"--hint {', '.join(missing)}: the {self.who}'s forward pass never ran "
                             "that module; name one it runs")
        out = [self._seen[i] for i in range(len(self.points))]
        self._seen.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
