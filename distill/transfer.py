"""Transfer sets: which examples the student learns from (pure numpy index selection).

Hinton, Vinyals & Dean (2015) distil on the training set, on a small fraction of it
(section 3: 3% of the speech data), and on a training set with one class omitted
(section 3: no 3s in MNIST's transfer set, fixed afterwards by raising the 3's output
bias). ``--transfer`` names one of these:

* ``train``            the whole training split (labels available)
* ``val``              the validation split
* ``fraction=F``       a seeded, class-stratified fraction 0 < F <= 1 of the training split
* ``omit=C1,C2``       the training split without the listed class ids
* ``unlabeled=PATH``   inputs from a file, no labels (the loss must use alpha = 0)
* ``munge=N[,p=P,s=S]`` N MUNGE pseudo-examples made from the training split (distill/munge.py),
                       labelled by the teacher only (alpha = 0)
* ``impressions=N[,beta=B1:B2,t=T,iters=I,lr=LR,batch=B,l2=W,clip=step|end]`` N data impressions synthesised from the
                       teacher alone (distill/impressions.py, Nayak et al. 2019): no training example

``fit_bias_shift`` then fits the omitted classes' bias on the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from kdens.data import stratified_subset
from kdens.errors import ConfigError, DataError

VALID_FORMS = ("train | val | fraction=F (0 < F <= 1) | omit=C1,C2 | unlabeled=PATH | munge=N[,p=P,s=S] | "
               "impressions=N[,beta=B1:B2,t=T,iters=I,lr=LR,batch=B,l2=W,clip=step|end]")

TransferKind = Literal["train", "val", "fraction", "omit", "unlabeled", "munge", "impressions"]

IMPRESSION_DEFAULTS = {"beta": (1.0, 0.1), "t": 20.0, "iters": 1500, "lr": 0.01, "batch": 256, "l2": 0.0,
                       "clip": "step"}
"""Nayak et al. (2019), section 4: beta 1.0 and 0.1 for half the impressions each, T = 20, Adam at
lr 0.01 for 1500 iterations; the batch only sets how many are optimised at once. The paper names
no penalty on the impressions and no clipping rule: ``l2`` (0: none) and ``clip`` (``step``: back
into the value range after every step; ``end``: only once, at the end) are kdens' levers."""
CLIP_MODES = ("step", "end")


@dataclass(frozen=True)
class TransferSpec:
    """A parsed ``--transfer`` value."""

    kind: TransferKind
    """Which form: train, val, fraction, omit or unlabeled."""
    fraction: float | None = None
    """Fraction of the training split kept, for ``fraction=F``."""
    classes: tuple[int, ...] = ()
    """Sorted class ids left out, for ``omit=...``."""
    path: str | None = None
    """File with unlabeled inputs, for ``unlabeled=PATH``."""
    count: int | None = None
    """Pseudo-examples to make, for ``munge=N`` and ``impressions=N``."""
    p: float = 0.5
    """MUNGE's per-attribute change probability."""
    s: float = 1.0
    """MUNGE's spread divisor."""
    betas: tuple[float, ...] = ()
    """Impressions: Dirichlet concentration scales, each for an equal share of the N."""
    t: float = 20.0
    """Impressions: the temperature of the teacher's softmax they are optimised against."""
    iters: int = 1500
    """Impressions: Adam iterations per impression."""
    lr: float = 0.01
    """Impressions: Adam learning rate."""
    batch: int = 256
    """Impressions: how many are optimised at once (one resumable unit)."""
    l2: float = 0.0
    """Impressions: weight W of the penalty ``W/2 * ||x||^2`` added to each impression's loss."""
    clip: str = "step"
    """Impressions: clip into the value range after every Adam step (``step``) or once at the end (``end``)."""

    @property
    def labeled(self) -> bool:
        """Whether the transfer set has labels (all forms but ``unlabeled``, ``munge`` and ``impressions``)."""
        return self.kind not in ("unlabeled", "munge", "impressions")

    def __str__(self) -> str:
        """Canonical spec string (stable for cache keys): ``omit=3,1`` -> ``omit=1,3``."""
        if self.kind == "fraction":
            return f"fraction={self.fraction!r}"
        if self.kind == "omit":
            return "omit=" + ",".join(str(c) for c in self.classes)
        if self.kind == "unlabeled":
            return f"unlabeled={self.path}"
        if self.kind == "munge":
            return f"munge={self.count},p={self.p!r},s={self.s!r}"
        if self.kind == "impressions":
            betas = ":".join(repr(b) for b in self.betas)
            # l2 and clip only when set: the string keys the cache, and sets made before they existed stay valid
            extra = (f",l2={self.l2!r}" if self.l2 else "") + (f",clip={self.clip}" if self.clip != "step" else "")
            return (f"impressions={self.count},beta={betas},t={self.t!r},iters={self.iters},lr={self.lr!r},"
                    f"batch={self.batch}{extra}")
        return self.kind


def _bad(spec: str, why: str) -> ConfigError:
    return ConfigError(f"--transfer {spec!r}: {why}; valid forms: {VALID_FORMS}")


def parse_transfer(spec: str) -> TransferSpec:
    """Parse a ``--transfer`` value (see the module docstring for the forms).

    Args:
        spec: e.g. ``"train"``, ``"fraction=0.03"``, ``"omit=3"``, ``"unlabeled=x.npz"``.

    Returns:
        The parsed spec; omitted classes sorted and de-duplicated. Class ids are
        checked against the dataset later, in ``omit_classes``; the path is not
        checked here (parsing touches no files).

    Raises:
        ConfigError: the spec has none of the valid forms; lists them.
    """
    if not isinstance(spec, str):
        raise _bad(str(spec), "expected a string")
    s = spec.strip()
    if s in ("train", "val"):
        return TransferSpec(kind=s)  # type: ignore[arg-type]
    name, sep, value = s.partition("=")
    name, value = name.strip(), value.strip()
    if not sep:
        raise _bad(spec, "unknown transfer set")
    if name == "fraction":
        try:
            f = float(value)
        except ValueError:
            raise _bad(spec, f"fraction {value!r} is not a number") from None
        if not 0.0 < f <= 1.0:  # also rejects nan
            raise _bad(spec, f"fraction must satisfy 0 < F <= 1, got {value}")
        return TransferSpec(kind="fraction", fraction=f)
    if name == "omit":
        parts = [p.strip() for p in value.split(",")]
        if not value or any(not p for p in parts):
            raise _bad(spec, "omit needs a comma-separated list of class ids, e.g. omit=3")
        try:
            ids = [int(p) for p in parts]
        except ValueError:
            raise _bad(spec, f"class ids must be integers, got {value!r}") from None
        if any(c < 0 for c in ids):
            raise _bad(spec, "class ids must be >= 0")
        return TransferSpec(kind="omit", classes=tuple(sorted(set(ids))))
    if name == "munge":
        head, *opts = [v.strip() for v in value.split(",")]
        try:
            count = int(head)
            kw = {k.strip(): float(v) for k, _, v in (o.partition("=") for o in opts)}
        except ValueError:
            raise _bad(spec, "munge takes N and optional p=P,s=S, e.g. munge=20000,p=0.5,s=1") from None
        if count <= 0:
            raise _bad(spec, f"munge=N needs N > 0 pseudo-examples, got {count}")
        if set(kw) - {"p", "s"}:
            raise _bad(spec, f"munge knows p= and s=, not {', '.join(sorted(set(kw) - {'p', 's'}))}")
        p, s_ = kw.get("p", 0.5), kw.get("s", 1.0)
        if not 0.0 < p <= 1.0 or not s_ > 0:
            raise _bad(spec, f"munge needs 0 < p <= 1 and s > 0, got p={p}, s={s_}")
        return TransferSpec(kind="munge", count=count, p=p, s=s_)
    if name == "impressions":
        return _parse_impressions(spec, value)
    if name == "unlabeled":
        if not value:
            raise _bad(spec, "unlabeled needs a path, e.g. unlabeled=extra.npz")
        return TransferSpec(kind="unlabeled", path=value)
    raise _bad(spec, f"unknown transfer set {name!r}")


def _parse_impressions(spec: str, value: str) -> TransferSpec:
    """``impressions=N[,beta=B1:B2,t=T,iters=I,lr=LR,batch=B,l2=W,clip=step|end]``; defaults from the paper."""
    head, *opts = [v.strip() for v in value.split(",")]
    example = "e.g. impressions=24000,beta=1:0.1,t=20,iters=1500"
    try:
        count = int(head)
    except ValueError:
        raise _bad(spec, f"impressions takes N first, {example}") from None
    if count <= 0:
        raise _bad(spec, f"impressions=N needs N > 0 impressions, got {count}")
    kw = dict(IMPRESSION_DEFAULTS)
    for o in opts:
        k, sep, v = (part.strip() for part in o.partition("="))
        if not sep or k not in IMPRESSION_DEFAULTS:
            raise _bad(spec, f"impressions knows {', '.join(f'{n}=' for n in IMPRESSION_DEFAULTS)}, not {o!r}")
        if k == "clip":
            if v not in CLIP_MODES:
                raise _bad(spec, f"impressions: clip={v!r} is not one of {', '.join(CLIP_MODES)}")
            kw[k] = v
            continue
        try:
            kw[k] = (tuple(float(b) for b in v.split(":")) if k == "beta"
                     else int(v) if k in ("iters", "batch") else float(v))
        except ValueError:
            raise _bad(spec, f"impressions: {k}={v!r} is not a number ({example})") from None
    betas = kw["beta"]
    if not betas or not all(b > 0 and b < float("inf") for b in betas):
        raise _bad(spec, f"impressions: every beta must be a finite number > 0, got {':'.join(map(str, betas))}")
    if not (0 < kw["t"] < float("inf") and 0 < kw["lr"] < float("inf")):
        raise _bad(spec, f"impressions: t and lr must be finite numbers > 0, got t={kw['t']}, lr={kw['lr']}")
    if not 0 <= kw["l2"] < float("inf"):
        raise _bad(spec, f"impressions: l2 must be a finite number >= 0, got l2={kw['l2']}")
    if kw["iters"] < 1 or kw["batch"] < 1:
        raise _bad(spec, f"impressions: iters and batch must be >= 1, got iters={kw['iters']}, batch={kw['batch']}")
    if count < len(betas):
        raise _bad(spec, f"impressions=N needs at least one impression per beta ({len(betas)}), got {count}")
    return TransferSpec(kind="impressions", count=count, betas=tuple(betas), t=float(kw["t"]),
                        iters=int(kw["iters"]), lr=float(kw["lr"]), batch=int(kw["batch"]), l2=float(kw["l2"]),
                        clip=kw["clip"])


def _labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    return y


def stratified_fraction(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, class-stratified subset of ``fraction`` of the examples (``fraction=F``).

    The same subset ``kdens train-generalist --train-fraction F`` trains on (it calls
    ``kdens.data.stratified_subset``), so a student distilled on ``fraction=F`` and a
    hard-label baseline trained on ``--train-fraction F`` see the same examples. Each
    class present keeps ``max(1, round(fraction * n_c))`` examples (Python rounding).

    Args:
        y: integer labels (N,).
        fraction: 0 < fraction <= 1.
        seed: random seed (the run's ``split_seed``).

    Returns:
        Sorted int64 indices into ``y``.

    Raises:
        ConfigError: fraction outside (0, 1].
        DataError: labels are not a 1-D integer array.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ConfigError(f"--transfer fraction must satisfy 0 < F <= 1, got {fraction}")
    y = _labels(y)
    if len(y) == 0:
        return np.zeros(0, dtype=np.int64)
    return stratified_subset(y, float(fraction), seed).astype(np.int64)


def omit_classes(
    y: np.ndarray, classes: tuple[int, ...] | list[int], *, num_classes: int
) -> np.ndarray:
    """Indices of the examples whose label is not one of ``classes``.

    Args:
        y: integer labels (N,).
        classes: class ids to leave out.
        num_classes: number of classes of the dataset, to validate the ids.

    Returns:
        Sorted int64 indices into ``y``.

    Raises:
        ConfigError: empty ``classes``, an id outside ``[0, num_classes)``, or every
            example omitted.
        DataError: labels are not a 1-D integer array.
    """
    y = _labels(y)
    cls = sorted({int(c) for c in classes})
    if not cls:
        raise ConfigError("--transfer omit=... needs at least one class id, e.g. omit=3")
    bad = [c for c in cls if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(
            f"--transfer omit: class ids {bad} are outside [0, {num_classes}); "
            f"this dataset has classes 0..{num_classes - 1}"
        )
    keep = np.flatnonzero(~np.isin(y, cls)).astype(np.int64)
    if len(keep) == 0:
        omitted = ",".join(map(str, cls))
        raise ConfigError(f"--transfer omit={omitted} leaves no examples to transfer on")
    return keep


# ---------------------------------------------------------------- omitted-class bias


def _class_recalls(pred: np.ndarray, y: np.ndarray, classes: list[int]) -> dict[int, float | None]:
    out: dict[int, float | None] = {}
    for c in classes:
        m = y == c
        out[c] = float((pred[m] == c).mean()) if m.any() else None
    return out


def _nll_of_shift(
    a: np.ndarray, b: np.ndarray, zy: np.ndarray, in_o: np.ndarray, s: float
) -> float:
    # log-sum-exp over all classes split into omitted (a = lse over O) and the rest (b)
    return float(np.mean(np.logaddexp(a + s, b) - zy - s * in_o))


def _nll_minimizer(a: np.ndarray, b: np.ndarray, frac_o: float) -> float:
    """Root of d NLL / ds = mean(sigmoid(a + s - b)) - frac_o (increasing in s)."""

    def grad(s: float) -> float:
        return float(np.mean(0.5 * (1.0 + np.tanh(0.5 * (a + s - b))))) - frac_o

    lo, hi = -1.0, 1.0
    while grad(lo) > 0:
        lo *= 2.0
    while grad(hi) < 0:
        hi *= 2.0
    for _ in range(200):  # bisection to machine precision; each step is one pass over N
        mid = 0.5 * (lo + hi)
        if grad(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def fit_bias_shift(
    logits_val: np.ndarray,
    y_val: np.ndarray,
    classes: tuple[int, ...] | list[int],
    *,
    criterion: Literal["accuracy", "nll"] = "accuracy",
    margin: float = 1e-3,
) -> tuple[float, dict]:
    """Fit one scalar added to the omitted classes' logits (their output biases).

    A student distilled without ever seeing class c still learns about c from the
    teacher's soft targets on other examples, but its bias for c ends up too low;
    Hinton et al. (2015, section 3) raised the 3's bias by 3.5 to recover 98.6% of
    the 3s. Here the shift s is fitted on the validation split.

    ``criterion="accuracy"`` (default) maximizes validation accuracy exactly and breaks
    ties by validation NLL. Accuracy as a function of s is piecewise constant: example
    i flips between its best omitted class and its best other class at
    ``t_i = max_{k not in O} z_ik - max_{k in O} z_ik``, so a sweep over the sorted
    t_i finds every interval of maximal accuracy (a grid could miss a narrow one).
    NLL(s) is convex in s (log-sum-exp of an affine function), so on each such
    interval its minimum is the global NLL minimizer clipped to the interval; that
    minimizer is the root of the monotone derivative ``mean_i P_i(O | s) - frac_O``,
    found by bisection. The returned shift stays ``margin`` inside the interval
    (half its width if it is narrower) so that float rounding does not land it on a
    tie. ``criterion="nll"`` returns the NLL minimizer itself.

    Args:
        logits_val: student logits (or log-probabilities) on the validation split, (N, C).
        y_val: validation labels (N,); must contain omitted and non-omitted classes.
        classes: the omitted class ids.
        criterion: ``"accuracy"`` or ``"nll"``, see above.
        margin: distance kept from accuracy breakpoints.

    Returns:
        ``(shift, info)`` where info holds shift, criterion, accuracy_before/after,
        nll_before/after, recall_before/after (per omitted class; None if absent
        from the validation split) and nll_optimal_shift.

    Raises:
        ConfigError: bad class ids or criterion.
        DataError: shapes disagree, or the validation split lacks omitted or
            non-omitted examples (then no shift is identifiable).
    """
    z = np.asarray(logits_val, dtype=np.float64)  # (N, C)
    y = _labels(y_val)
    if z.ndim != 2 or z.shape[0] != len(y):
        raise DataError(f"logits {z.shape} and labels {y.shape} do not match as (N, C) and (N,)")
    if criterion not in ("accuracy", "nll"):
        raise ConfigError(f"criterion must be 'accuracy' or 'nll', got {criterion!r}")
    n, c = z.shape
    cls = sorted({int(k) for k in classes})
    if not cls or any(not 0 <= k < c for k in cls):
        raise ConfigError(f"omitted classes {cls} must be a non-empty subset of 0..{c - 1}")
    if len(cls) == c:
        raise ConfigError("cannot fit a bias shift when every class is omitted")
    in_o = np.isin(y, cls)  # (N,)
    if in_o.all() or not in_o.any():
        raise DataError(
            "the validation split needs examples of both omitted and kept classes to fit "
            f"the bias shift; it has {int(in_o.sum())} omitted-class examples of {n}"
        )
    o_mask = np.zeros(c, dtype=bool)
    o_mask[cls] = True
    zo, zr = z[:, o_mask], z[:, ~o_mask]  # (N, |O|), (N, C - |O|)
    a = np.logaddexp.reduce(zo, axis=1)  # (N,)
    b = np.logaddexp.reduce(zr, axis=1)  # (N,)
    zy = z[np.arange(n), y]  # (N,)
    s_nll = _nll_minimizer(a, b, float(in_o.mean()))

    if criterion == "nll":
        shift = s_nll
    else:
        o_ids, r_ids = np.flatnonzero(o_mask), np.flatnonzero(~o_mask)
        t = zr.max(1) - zo.max(1)  # (N,) the shift at which example i flips to O
        # correct for s > t_i if the label is omitted and the best omitted class is it
        gain = in_o & (o_ids[zo.argmax(1)] == y)
        # correct for s < t_i if the label is kept and the best kept class is it
        lose = ~in_o & (r_ids[zr.argmax(1)] == y)
        u = np.unique(t)  # (m,) sorted breakpoints
        # acc on interval j = (u_{j-1}, u_j), j = 0..m with u_{-1} = -inf, u_m = +inf
        n_gain = np.searchsorted(u, t[gain], side="left") + 1  # first interval above t_i
        n_lose = np.searchsorted(u, t[lose], side="left")  # intervals strictly below t_i
        correct = np.zeros(len(u) + 1, dtype=np.int64)
        np.add.at(correct, n_gain, 1)
        correct = np.cumsum(correct)  # (m+1,) gains switched on up to interval j
        lose_count = np.zeros(len(u) + 2, dtype=np.int64)
        np.add.at(lose_count, n_lose + 1, 1)
        correct += len(n_lose) - np.cumsum(lose_count)[: len(u) + 1]
        best = correct.max()
        lows = np.concatenate([[-np.inf], u])  # (m+1,)
        highs = np.concatenate([u, [np.inf]])  # (m+1,)
        shift, best_nll = 0.0, np.inf
        for j in np.flatnonzero(correct == best):
            lo, hi = lows[j], highs[j]
            pad = min(margin, (hi - lo) / 2) if np.isfinite(hi - lo) else margin
            cand = float(np.clip(s_nll, lo + pad, hi - pad))
            cand_nll = _nll_of_shift(a, b, zy, in_o, cand)
            if cand_nll < best_nll:
                shift, best_nll = cand, cand_nll

    after = z.copy()
    after[:, o_mask] += shift
    pred_before, pred_after = z.argmax(1), after.argmax(1)
    info = {
        "shift": float(shift),
        "criterion": criterion,
        "omitted_classes": cls,
        "accuracy_before": float((pred_before == y).mean()),
        "accuracy_after": float((pred_after == y).mean()),
        "nll_before": _nll_of_shift(a, b, zy, in_o, 0.0),
        "nll_after": _nll_of_shift(a, b, zy, in_o, float(shift)),
        "recall_before": _class_recalls(pred_before, y, cls),
        "recall_after": _class_recalls(pred_after, y, cls),
        "nll_optimal_shift": float(s_nll),
    }
    return float(shift), info
