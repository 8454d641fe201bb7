"""Distillation methods: one module each, one registry (``METHODS``), chosen by ``--method``.

Logit methods read the teacher's scores (from the soft-target cache, or online under
jitter) and accept every kind of teacher: ``kd``, ``soft``, ``logits``, ``dkd``, ``dist``,
``lskd``; ``tfkd-self`` wants the pretrained student itself. ``tfkd-virtual`` has no teacher.
Feature methods (``fitnets``, ``fsp``, ``rkd``) read hidden layers by module name (``--hint``)
and need a teacher that is one network, run online. docs/methods.md lists formulas,
papers, defaults and teachers; each module's docstring has the formula and the paper.
"""

from __future__ import annotations

from distill.methods.base import Method, Param, Phase
from distill.methods.dist import DIST
from distill.methods.dkd import DKD
from distill.methods.features import FeatureBatch, FeatureMethod
from distill.methods.fitnets import FitNets
from distill.methods.fsp import FSP
from distill.methods.kd import KD, Soft
from distill.methods.logits import Logits
from distill.methods.lskd import LSKD
from distill.methods.rkd import RKD
from distill.methods.tfkd_self import TfKDSelf
from distill.methods.tfkd_virtual import TfKDVirtual
from kdens.errors import ConfigError

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (KD, Soft, Logits, FitNets, FSP, RKD, DKD, DIST, LSKD, TfKDSelf, TfKDVirtual)
}
"""``--method`` name -> method class."""

LOSS_ALIASES = ("kd", "soft", "logits")
"""The methods ``--loss`` also names, and whose ``--temperature`` / ``--alpha`` are kdens' own flags."""

FEATURE_METHODS = tuple(n for n, m in METHODS.items() if m.features)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; ConfigError listing the valid names otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown --method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def make_method(name: str, args: dict | None = None) -> Method:
    """A method instance with its ``--method-arg`` values checked and defaults filled in."""
    return method_class(name)(args)


__all__ = ["METHODS", "LOSS_ALIASES", "FEATURE_METHODS", "Method", "FeatureMethod", "FeatureBatch", "Param",
           "Phase", "method_class", "make_method"]
