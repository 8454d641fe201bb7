"""Data impressions: a transfer set synthesised from the teacher alone (``--transfer impressions=N``).

Nayak, Mopuri, Shaj, Babu & Chakraborty, "Zero-Shot Knowledge Distillation in Deep Networks",
ICML 2019, section 3:

1. Class similarity from the teacher's final layer ``W`` (C, d): rows scaled to unit norm,
   ``S = W_n W_n^T`` (C, C), each row min-max normalised to [0, 1] (a class is most similar to
   itself: 1; its least similar class: 0).
2. Soft labels ``y ~ Dir(beta * S[k])`` for class k; each beta (the paper: 1.0 and 0.1) makes an
   equal share of the N impressions, spread evenly over the classes. A large beta gives labels
   near the class's similarity profile, a small one near one-hot.
3. Each impression ``x`` starts uniform over the data's value range, and Adam minimises
   ``CE(y, softmax(teacher(x) / T))`` (T = 20 in the paper) for ``iters`` steps; after each step
   ``x`` is clipped back into the value range, so impressions have the data's layout and range.
   Two levers the paper does not name (``l2=W``, ``clip=end``): a penalty ``W/2 * ||x||^2`` added to
   each impression's loss, and clipping only once, after the last step (a third-party
   reimplementation, sseung0703/Zero-shot_Knowledge_Distillation, does both, with W = 1e-3).
   A teacher that standardises its inputs does so inside its forward (``kdens.models.Standardized``),
   so ``x`` is optimised in the raw input space, as the data is given.

No training example enters: the teacher's weights are the only source. The value range is
[0, 1] for images kdens scales (uint8 or [0, 1] floats, the teacher then has no normalisation);
otherwise the training split's per-channel (per-feature) minimum and maximum, two numbers per
channel, recorded in the manifest like the normalisation the teacher already carries.

Impressions are made in batches of ``batch`` at once (every impression has its own Adam state
and loss term, so the batch changes only the speed). Each finished batch is saved atomically
as ``batch-NNNNN.npy`` in ``<cache_dir>/impressions-<key>/`` and skipped when the run is
repeated; ``manifest.json`` (written last, with every batch's sha256) marks the set finished.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from distill.cache import cache_key
from distill.transfer import TransferSpec
from kdens.artifacts import atomic_save_npy, atomic_write_json, read_json, sha256_file
from kdens.errors import ArtifactError, ConfigError

DIRICHLET_FLOOR = 1e-6
"""Smallest concentration: min-max normalisation gives each class's least similar class 0, which
a Dirichlet does not take; at 1e-6 that class's sampled probability is still essentially 0."""


def check_teacher(teacher, spec_text: str | None) -> nn.Linear:
    """The teacher's final linear layer, or a one-line ConfigError saying why impressions cannot be made."""
    from distill.teachers import ModelTeacher

    if teacher is None:
        raise ConfigError("--transfer impressions synthesises inputs from a teacher's weights; give --teacher "
                          "(a generalist or student run folder)")
    if not isinstance(teacher, ModelTeacher):
        kind = getattr(teacher, "stage", type(teacher).__name__)
        raise ConfigError(f"--transfer impressions optimises inputs through the teacher, so --teacher must be one "
                          f"torch network (a generalist or student run folder); {spec_text} is a {kind} teacher, "
                          "which cannot be differentiated as one network (precomputed scores and ONNX files "
                          "cannot at all); distill from one of its torch members instead")
    if teacher.spec.get("format") == "onnx":  # kdens import-model --onnx: ONNX Runtime gives no gradients
        raise ConfigError("--transfer impressions optimises inputs through the teacher's gradients, but the teacher "
                          "is an imported ONNX file that ONNX Runtime runs without them; import its PyTorch model "
                          "instead (kdens import-model --model pkg.module:factory --weights FILE)")
    head = getattr(teacher.model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"--transfer impressions reads the class similarity from the teacher's final nn.Linear, "
                          f"named 'head'; the teacher's model ({teacher.spec.get('name')}) has none")
    return head


def class_similarity(weight: Tensor) -> Tensor:
    """Row-wise min-max normalised cosine similarity of the final layer's class rows (Nayak et al. eq. 2).

    Args:
        weight: the final layer's weight (C, d).

    Returns:
        (C, C) float64 with 1 on the diagonal and 0 at each row's least similar class.
    """
    w = weight.detach().double()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (C, d)
    s = w @ w.T  # (C, C)
    lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values  # (C, 1)
    return (s - lo) / (hi - lo).clamp_min(1e-12)


def sample_targets(sim: np.ndarray, n: int, betas: tuple[float, ...], seed: int) -> tuple[np.ndarray, dict]:
    """``n`` soft labels ``y ~ Dir(beta * sim[k])``: equal shares per beta, classes evenly, then shuffled.

    Returns:
        (targets (n, C) float32, {"classes": (n,), "betas": (n,)} the class and beta each was drawn for).
    """
    rng = np.random.default_rng([seed, 1])
    c = len(sim)
    shares = [n // len(betas) + (i < n % len(betas)) for i in range(len(betas))]
    classes = np.concatenate([np.arange(m) % c for m in shares])  # (n,) classes round-robin within a beta
    beta_of = np.repeat(np.asarray(betas, np.float64), shares)  # (n,)
    conc = np.maximum(beta_of[:, None] * sim[classes], DIRICHLET_FLOOR)  # (n, C)
    y = np.stack([rng.dirichlet(a) for a in conc]).astype(np.float32)  # (n, C)
    order = rng.permutation(n)  # batches and the held-out share mix every class and beta
    return y[order], {"classes": classes[order], "betas": beta_of[order]}


def value_range(data) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest input value, broadcastable over a batch: (1, C, 1, 1) images, (1, D) features."""
    x = data.x_train
    if data.normalization is None:  # kdens scales such images to [0, 1] (kdens.data.normalization)
        shape = (1, x.shape[1], 1, 1) if x.ndim == 4 else (1, x.shape[1])
        return np.zeros(shape, np.float32), np.ones(shape, np.float32)
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    return (x.min(axis=axes, keepdims=True).astype(np.float32),
            x.max(axis=axes, keepdims=True).astype(np.float32))


def optimise(model: nn.Module, y: Tensor, x0: Tensor, lo: Tensor, hi: Tensor, t: float, iters: int,
             lr: float, l2: float = 0.0, clip_every_step: bool = True) -> tuple[Tensor, Tensor]:
    """Adam on inputs ``x`` so that ``softmax(model(x) / t)`` matches the soft labels ``y``.

    Minimises ``sum_i [CE(y_i, softmax(model(x_i) / t)) + l2/2 * ||x_i||^2]``: a sum, so each
    impression's gradient is its own (Adam's per-element state keeps them independent too). ``x``
    is clipped into ``[lo, hi]`` after every step, or only after the last one when
    ``clip_every_step`` is False. The model must be in eval mode with frozen parameters.

    Returns:
        (x (B, ...) float32 detached, the final per-impression cross-entropy (B,)).
    """
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(iters):
        logp = torch.log_softmax(model(x).float() / t, dim=1)  # (B, C)
        loss = -(y * logp).sum()
        if l2:
            loss = loss + 0.5 * l2 * x.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if clip_every_step:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    with torch.no_grad():
        x.copy_(torch.maximum(torch.minimum(x, hi), lo))
        ce = -(y * torch.log_softmax(model(x).float() / t, dim=1)).sum(1)  # (B,)
    return x.detach(), ce


class _Shown:
    """Progress per batch: a bar on a terminal, one line per batch in a log, nothing when off."""

    def __init__(self, total: int, done: int, enabled: bool):
        from kdens.progress import mode

        self.mode, self.total = mode(enabled), total
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=done, desc="impressions", unit="batch", dynamic_ncols=True)
        elif self.mode == "lines" and done:
            print(f"impressions: {done}/{total} batches already made (cached), making the rest", file=sys.stderr,
                  flush=True)

    def update(self, b: int, made: int, n: int, ce: float, agree: float, seconds: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix({"ce": f"{ce:.3f}", "agree": f"{agree:.2f}"}, refresh=False)
            self.bar.update(1)
        elif self.mode == "lines":
            print(f"impressions: batch {b + 1}/{self.total}  {made}/{n} made  ce={ce:.4f}  teacher argmax = "
                  f"sampled argmax for {agree:.0%}  {seconds:.1f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generate(teacher, spec: TransferSpec, data, seed: int, cache_dir: Path, *,
             progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """The N impressions of ``spec`` for ``teacher``: from the cache, finishing missing batches first.

    Args:
        teacher: a ``distill.teachers.ModelTeacher`` (checked with ``check_teacher``).
        spec: a parsed ``impressions=...`` transfer spec.
        data: the dataset, for its input shape, value range and fingerprint (no example is read
            unless the value range needs its per-channel extremes, see the module docstring).
        seed: seeds the soft labels and every batch's starting point.
        cache_dir: the run's soft-target cache folder; impressions go into ``impressions-<key>/``.
        progress: show progress per batch.

    Returns:
        (x (N, ...) float32, sampled soft labels (N, C) float32, info for the manifest).
    """
    head = check_teacher(teacher, str(spec))
    lo, hi = value_range(data)
    key = cache_key(teacher.manifest_hashes, data.fingerprint, str(spec),
                    {"kind": "impressions", "seed": int(seed), "low": lo.ravel().tolist(), "high": hi.ravel().tolist()})
    folder = Path(cache_dir) / f"impressions-{key}"
    sim = class_similarity(head.weight).cpu().numpy()  # (C, C)
    y, drawn = sample_targets(sim, spec.count, spec.betas, seed)
    n, bs = spec.count, spec.batch
    batches = [(b, i, min(i + bs, n)) for b, i in enumerate(range(0, n, bs))]
    finished = _finished(folder, key, len(batches))
    t0 = time.perf_counter()
    done = [b for b, _, _ in batches if finished or (folder / _name(b)).exists()]
    shown = _Shown(len(batches), len(done), progress and not finished)
    model, device = teacher.model, teacher.device
    flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    dev_lo, dev_hi = torch.from_numpy(lo).to(device), torch.from_numpy(hi).to(device)
    xs = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for b, i, j in batches:
            path = folder / _name(b)
            if b in done:
                xs.append(np.load(path))
                continue
            rng = np.random.default_rng([seed, 2, b])  # each batch's start depends on nothing else
            x0 = lo + (hi - lo) * rng.random((j - i, *data.input_shape), dtype=np.float32)
            tb = time.perf_counter()
            yb = torch.from_numpy(y[i:j]).to(device)
            x, ce = optimise(model, yb, torch.from_numpy(x0).to(device), dev_lo, dev_hi, spec.t, spec.iters, spec.lr,
                             spec.l2, spec.clip == "step")
            with torch.no_grad():
                agree = float((model(x).argmax(1) == yb.argmax(1)).float().mean())
            xs.append(x.cpu().numpy())
            atomic_save_npy(path, xs[-1])
            shown.update(b, j, n, float(ce.mean()), agree, time.perf_counter() - tb)
    finally:
        shown.close()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    x = np.concatenate(xs)
    with torch.inference_mode():  # how many impressions the teacher puts in the class they were drawn for
        pred = np.concatenate([teacher(torch.from_numpy(x[i:i + 1024])).argmax(1).cpu().numpy()
                               for i in range(0, n, 1024)])
    info = {"spec": str(spec), "examples": n, "labeled": False, "key": key, "folder": str(folder),
            "seed": int(seed), "value_range": {"low": lo.ravel().tolist(), "high": hi.ravel().tolist(),
                                                "from": "[0, 1] by kdens' scaling" if data.normalization is None
                                                else "per-channel min/max of the training split"},
            "teacher_argmax_matches_sampled": round(float((pred == y.argmax(1)).mean()), 4),
            "reused_batches": len(done), "batches": len(batches),
            "beta_counts": {repr(b): int((drawn["betas"] == b).sum()) for b in spec.betas}}
    if not finished:
        _write_manifest(folder, key, spec, batches, info, round(time.perf_counter() - t0, 3))
    return x, y, {**info, "build_seconds": read_json(folder / "manifest.json").get("seconds")}


def _name(b: int) -> str:
    return f"batch-{b:05d}.npy"


def _finished(folder: Path, key: str, n_batches: int) -> bool:
    """Whether ``folder`` holds a finished set for ``key`` whose batch files match their hashes."""
    path = folder / "manifest.json"
    if not path.exists():
        return False
    m = read_json(path)
    if m.get("key") != key or len(m.get("sha256", {})) != n_batches:
        raise ArtifactError(f"{path} does not describe these impressions (key {key}); delete {folder} to redo them")
    for name, sha in m["sha256"].items():
        if not (folder / name).exists() or sha256_file(folder / name) != sha:
            raise ArtifactError(f"{folder / name} is missing or does not match {path}; delete {folder} to redo it")
    return True


def _write_manifest(folder: Path, key: str, spec: TransferSpec, batches: list, info: dict, seconds: float) -> None:
    hashes = {_name(b): sha256_file(folder / _name(b)) for b, _, _ in batches}
    atomic_write_json(folder / "manifest.json", {
        "stage": "impressions", "key": key, "spec": str(spec), "count": spec.count,
        "seconds": seconds, "seed": info["seed"], "value_range": info["value_range"],
        "sha256": hashes, "complete": True})
