"""Groups of confusable classes from the generalist's predictions (Hinton et al. 2015, §5.2).

The paper groups the classes that the generalist often confuses: it clusters the
covariance matrix of the generalist's predictions so that classes often predicted
together form one specialist's group S_m. It ran an online k-means on the columns of
that matrix; here it is scikit-learn's ``KMeans`` or ``MiniBatchKMeans``.

Each group gets one specialist; a group of one class gets none (there is nothing for a
specialist to tell apart), and neither does a group holding every class (its dustbin
would be empty).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin

from kdens.errors import ConfigError

AFFINITIES = ("covariance", "normalized", "correlation")
ALGORITHMS = ("kmeans", "minibatch")
STABILITY_SEEDS = 10  # k-means seeds compared by seed_stability (cheap: C points of dimension C)


def _unit_columns(m: np.ndarray) -> np.ndarray:
    """Scale each column to unit L2 norm; all-zero columns (never-predicted classes) stay zero."""
    norms = np.linalg.norm(m, axis=0, keepdims=True)  # (1, C)
    return m / np.where(norms > 0, norms, 1.0)


def _correlation(cov: np.ndarray) -> np.ndarray:
    """Correlation from covariance; a constant column correlates with nothing but itself."""
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))  # (C,)
    denom = np.outer(sd, sd)
    corr = np.where(denom > 0, cov / np.where(denom > 0, denom, 1.0), 0.0)
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)


class ConfusionClusterer(ClusterMixin, BaseEstimator):
    """k-means on the columns of the covariance of softmax predictions.

    Follows scikit-learn's estimator contract: ``__init__`` only stores parameters,
    ``fit`` validates them and returns ``self``, learned attributes end in ``_``, and
    all randomness goes through ``random_state``.

    Why ``affinity="normalized"`` is the default: the paper clustered raw covariance
    columns over 15,000 classes. With few classes (10) a raw column is dominated by
    its own diagonal entry, the class's variance, so columns are far apart mostly by
    how often each class is predicted, not by which classes it is confused with, and
    k-means finds no confusable groups (measured on Fashion-MNIST: K=4 gave one 7-class
    group plus singletons). Scaling each column to unit L2 norm keeps only its
    direction, the pattern of co-prediction; at K=3 it found {T-shirt, Pullover, Coat,
    Shirt}, {Sandal, Sneaker, Ankle boot} and {Trouser, Dress, Bag}. ``"correlation"``
    is the other scale-free choice.

    Why ``algorithm="kmeans"`` with ``n_init=100`` is the default (issue 17, measured by
    ``bench/bench_clustering.py``, BENCHMARKS.md section 8): over digits, Fashion-MNIST and
    a synthetic 100-class set, 10 seeds each, the online ``minibatch`` k-means (the
    previous default, n_init=10) agreed with itself across seeds at a mean pairwise
    adjusted Rand index of 0.20 and found the true groups of the synthetic set at ARI
    0.64; Lloyd's k-means with 10 restarts 0.77 and 0.90, with 100 restarts 0.94 and
    0.95. There the true grouping scores as low an inertia as the best one found, so
    finding it is a search problem, and restarts are cheap: the points are the C columns
    of a C x C matrix (0.5 s per fit at C = 100 with 100 restarts, single-threaded).

    Args:
        n_clusters: number of k-means clusters K, 1 <= K <= C.
        affinity: the matrix whose columns are clustered: ``"covariance"`` (raw
            columns, as in the paper), ``"normalized"`` (covariance columns scaled to
            unit L2 norm) or ``"correlation"`` (the correlation matrix).
        algorithm: ``"kmeans"`` (Lloyd) or ``"minibatch"`` (online, as in the paper;
            it scales to more classes but is far less stable across seeds here).
        random_state: seed for k-means initialisation.
        n_init: number of k-means restarts; the lowest-inertia run is kept.

    Attributes:
        covariance_: covariance of P's columns, shape (C, C).
        affinity_: the matrix whose columns were clustered, shape (C, C).
        labels_: cluster of each class, shape (C,).
        inertia_: k-means inertia of the kept run.
        cluster_centers_: shape (K, C).
        all_groups_: every cluster as a sorted list of class ids, sorted.
        groups_: the clusters that get a specialist: 2 <= size < C.
        n_features_in_: C.
    """

    def __init__(
        self,
        n_clusters: int = 3,
        affinity: str = "normalized",
        algorithm: str = "kmeans",
        random_state: int | None = 0,
        n_init: int = 100,
    ):
        self.n_clusters = n_clusters
        self.affinity = affinity
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_init = n_init

    def _validate(self, num_classes: int) -> None:
        k = self.n_clusters
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= num_classes:
            raise ConfigError(
                f"n_clusters must be an integer in [1, {num_classes}] (the number of classes), got {k!r}"
            )
        if self.affinity not in AFFINITIES:
            raise ConfigError(f"unknown affinity {self.affinity!r}; valid: {', '.join(AFFINITIES)}")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm {self.algorithm!r}; valid: {', '.join(ALGORITHMS)}")
        if not isinstance(self.n_init, numbers.Integral) or self.n_init < 1:
            raise ConfigError(f"n_init must be an integer >= 1, got {self.n_init!r}")

    def fit(self, P, y=None) -> ConfusionClusterer:
        """Cluster the classes from the generalist's predictions on held-out data.

        Args:
            P: softmax predictions on the validation split, shape (N, C), N >= 2.
            y: ignored; present for scikit-learn API compatibility.

        Returns:
            self.
        """
        if isinstance(P, torch.Tensor):
            P = P.detach().cpu().numpy()
        P = np.asarray(P, dtype=np.float64)
        if P.ndim != 2 or P.shape[0] < 2 or P.shape[1] < 2:
            raise ConfigError(
                f"predictions P must have shape (N >= 2 examples, C >= 2 classes), got {P.shape}"
            )
        if not np.isfinite(P).all():
            raise ConfigError("predictions P contain NaN or inf; pass softmax probabilities")
        num_classes = P.shape[1]
        self._validate(num_classes)

        cov = np.cov(P, rowvar=False)  # (C, C)
        if self.affinity == "covariance":
            aff = cov
        elif self.affinity == "normalized":
            aff = _unit_columns(cov)
        else:
            aff = _correlation(cov)

        from sklearn.cluster import KMeans, MiniBatchKMeans

        if self.algorithm == "kmeans":
            km = KMeans(self.n_clusters, n_init=self.n_init, random_state=self.random_state)
        else:
            km = MiniBatchKMeans(self.n_clusters, n_init=self.n_init, random_state=self.random_state)
        # each class is one point: its column of the affinity matrix
        km.fit(aff.T)  # rows of aff.T = columns of aff, (C, C)

        self.covariance_ = cov
        self.affinity_ = aff
        self.labels_ = km.labels_.astype(np.int64)  # (C,)
        self.inertia_ = float(km.inertia_)
        self.cluster_centers_ = km.cluster_centers_
        self.n_features_in_ = num_classes
        clusters = [sorted(np.flatnonzero(self.labels_ == c).tolist()) for c in np.unique(self.labels_)]
        self.all_groups_ = sorted(clusters)
        self.groups_ = [g for g in self.all_groups_ if 2 <= len(g) < num_classes]
        return self


def seed_stability(estimator: ConfusionClusterer, P, n_seeds: int = STABILITY_SEEDS) -> dict:
    """How much the clustering of ``P`` depends on the k-means seed: mean pairwise adjusted Rand index.

    ``estimator`` is cloned (scikit-learn's ``clone``: same parameters, nothing learned)
    with ``random_state`` = s, s + 1, ..., s + n_seeds - 1 (s its own seed, or 0) and fitted to
    ``P``; every pair of the resulting labelings is compared by the adjusted Rand index
    (1 = the same partition, ~0 = chance agreement).

    Returns:
        ``seeds``, ``mean_pairwise_ari``, ``min_pairwise_ari``, ``distinct_partitions`` (how
        many different groupings the seeds found) and ``share_like_first`` (the share of
        seeds whose grouping equals seed s's, i.e. the one a run with that seed uses).
    """
    from sklearn.base import clone
    from sklearn.metrics import adjusted_rand_score

    if not isinstance(n_seeds, numbers.Integral) or n_seeds < 2:
        raise ConfigError(f"n_seeds must be an integer >= 2 to compare seeds, got {n_seeds!r}")
    start = int(estimator.random_state or 0)
    seeds = list(range(start, start + int(n_seeds)))
    labels = [clone(estimator).set_params(random_state=s).fit(P).labels_ for s in seeds]
    pairs = [adjusted_rand_score(labels[i], labels[j]) for i in range(len(labels)) for j in range(i + 1, len(labels))]
    partitions = {tuple(sorted(tuple(np.flatnonzero(lab == c)) for c in np.unique(lab))) for lab in labels}
    same = [adjusted_rand_score(labels[0], lab) == 1.0 for lab in labels]
    return {"seeds": seeds, "mean_pairwise_ari": float(np.mean(pairs)), "min_pairwise_ari": float(np.min(pairs)),
            "distinct_partitions": len(partitions), "share_like_first": float(np.mean(same))}


def parse_groups(spec: str, num_classes: int) -> list[list[int]]:
    """Parse class groups written as ``"0,2,4,6;5,7,9"`` (groups split by ``;``).

    Args:
        spec: groups separated by ``;``, class ids within a group by ``,``.
        num_classes: C; ids must lie in [0, C).

    Returns:
        Sorted list of sorted groups.

    Raises:
        ConfigError: a non-integer id, an id out of range, a class in two groups, a
            repeated id, a group of fewer than 2 classes or one holding every class.
    """
    groups: list[list[int]] = []
    seen: dict[int, int] = {}
    parts = [p.strip() for p in str(spec).split(";")]
    if not spec or not str(spec).strip() or all(not p for p in parts):
        raise ConfigError(f"no class groups in {spec!r}; write them like '0,2,4,6;5,7,9'")
    for gi, part in enumerate(parts):
        if not part:
            raise ConfigError(f"empty group #{gi + 1} in {spec!r}; remove the extra ';'")
        ids = []
        for tok in part.split(","):
            tok = tok.strip()
            try:
                c = int(tok)
            except ValueError:
                raise ConfigError(
                    f"class id {tok!r} in group {part!r} is not an integer; write groups like '0,2,4,6;5,7,9'"
                ) from None
            if not 0 <= c < num_classes:
                raise ConfigError(f"class id {c} in group {part!r} is out of range [0, {num_classes - 1}]")
            if c in ids:
                raise ConfigError(f"class id {c} is repeated in group {part!r}")
            if c in seen:
                raise ConfigError(
                    f"class {c} is in group #{seen[c] + 1} and group #{gi + 1}; groups must be disjoint"
                )
            ids.append(c)
        for c in ids:
            seen[c] = gi
        if len(ids) < 2:
            raise ConfigError(
                f"group {part!r} has {len(ids)} class; a specialist needs at least 2 classes to tell apart"
            )
        if len(ids) >= num_classes:
            raise ConfigError(
                f"group {part!r} holds all {num_classes} classes, leaving the specialist's dustbin empty; "
                "split it into smaller groups"
            )
        groups.append(sorted(ids))
    return sorted(groups)
