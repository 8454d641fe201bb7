"""``kdens train-specialists`` settings: a typed dataclass built from defaults < [train-specialists] table < flags.

The data (dataset, validation split, training subset) are the generalist's own, read
from its manifest, so they have no flags here: clusters come from its predictions on
its validation split, and the combination is scored on its test split.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from kdens.errors import ConfigError
from kdens.train import TrainConfig
from specialists.cluster import AFFINITIES, ALGORITHMS
from specialists.model import INITS


@dataclass
class SpecialistsConfig:
    """``kdens train-specialists``: a generalist plus specialists for its confusable classes (Hinton et al. 2015)."""

    generalist: str
    """Run folder of a finished generalist (kdens train-generalist); its data and architecture are reused."""
    clusters: int | None = None
    """Number of k-means clusters K of the classes; groups of one class get no specialist."""
    groups: str | None = None
    """Class groups given by hand instead of --clusters, e.g. "0,2,4,6;5,7,9" (one specialist each)."""
    affinity: str = "normalized"
    """Matrix whose columns are clustered: covariance (the paper's), normalized (unit-norm columns) or correlation."""
    cluster_algorithm: str = "kmeans"
    """k-means flavour: kmeans (Lloyd) or minibatch (online, as in the paper; measured far less stable,
    BENCHMARKS.md section 8)."""
    cluster_restarts: int = 100
    """k-means restarts (n_init); the lowest-inertia grouping is kept. Cheap: the points are C columns of a
    C x C matrix."""
    top_n: int = 1
    """A specialist takes part when its group meets the generalist's top-n classes."""
    init: str = "exact"
    """How a specialist starts: exact (the generalist restricted to its group: a copy whose dustbin logit is the
    log-sum-exp of the other classes' logits, equal at step 0; any architecture) or fitted-row (the generalist's
    architecture with |S| + 1 outputs and a linear dustbin row fitted to that log-sum-exp). Measured on the
    many-class set (BENCHMARKS.md section 8): fitted-row specialists end with a lower validation NLL (55 of 60), but
    students distilled from exact-start teachers were as good or better (4 of 6 runs)."""
    drop_unhelpful: bool = True
    """Check each specialist on the validation split (with the generalist, as the combination uses it) and
    drop one that does not lower the NLL or loses correct answers there; its group is left to the generalist
    (specialists.check; recorded in metrics.json and clusters.json). False keeps every specialist."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation of every specialist (flat keys: epochs, lr, jitter, ...); specialist m uses seed + m,
    and seed also seeds k-means."""

    def __post_init__(self):
        if not str(self.generalist or "").strip():
            raise ConfigError("--generalist RUN is required: the folder of a finished kdens train-generalist run")
        if self.groups is not None and not isinstance(self.groups, str):
            raise ConfigError(f"--groups {self.groups!r} must be a string like '0,2,4,6;5,7,9'")
        if self.groups is not None and self.clusters is not None:
            raise ConfigError("give either --clusters K (groups found by k-means) or --groups (by hand), not both")
        if self.groups is None and self.clusters is None:
            raise ConfigError("--clusters K is required (or --groups '0,2,4,6;5,7,9' to give the groups by hand)")
        if self.clusters is not None and (isinstance(self.clusters, bool) or not isinstance(self.clusters, int)
                                          or self.clusters < 1):
            raise ConfigError(f"--clusters {self.clusters!r} must be an integer >= 1")
        if self.affinity not in AFFINITIES:
            raise ConfigError(f"--affinity {self.affinity!r} unknown; valid: {', '.join(AFFINITIES)}")
        if self.cluster_algorithm not in ALGORITHMS:
            raise ConfigError(f"--cluster-algorithm {self.cluster_algorithm!r} unknown; valid: {', '.join(ALGORITHMS)}")
        if isinstance(self.cluster_restarts, bool) or not isinstance(self.cluster_restarts, numbers.Integral) \
                or self.cluster_restarts < 1:
            raise ConfigError(f"--cluster-restarts {self.cluster_restarts!r} must be an integer >= 1")
        if isinstance(self.top_n, bool) or not isinstance(self.top_n, numbers.Integral) or self.top_n < 1:
            raise ConfigError(f"--top-n {self.top_n!r} must be an integer >= 1")
        if self.init not in INITS:
            raise ConfigError(f"--init {self.init!r} unknown; valid: {', '.join(INITS)}")
        if not isinstance(self.drop_unhelpful, bool):
            raise ConfigError(f"--drop-unhelpful {self.drop_unhelpful!r} must be true or false")
