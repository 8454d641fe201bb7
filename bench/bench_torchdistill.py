"""kdens vs torchdistill: the same KD job (Hinton et al. 2015) run by each, wall time and accuracy.

Both sides get the same teacher (a kdens run folder), student (kdens registry, same init
seed), data and validation split, epochs, batch size, optimizer (SGD, Nesterov momentum
0.9, weight decay on weights only, kdens' defaults), per-step cosine LR to zero, gradient
clipping, T and alpha, and pick the weights of the epoch with the lowest validation
cross-entropy (kdens' rule). Test metrics of both come from ``kdens.evaluate.evaluate_model``.

* kdens: ``distill.stage.run`` (what ``kdens distill`` calls) in a fresh folder, so the
  soft-target cache is built inside the timed run: one teacher pass, then cached scores
  indexed per step; data batched by index from in-memory tensors.
* torchdistill: its config-driven ``DistillationBox`` (``get_distillation_box``) with the
  ``WeightedSumLoss`` / ``KDLoss`` criterion of its sample KD configs, the datasets as
  in-memory ``TensorDataset``s, and the epoch loop of its ``examples/torchvision/
  image_classification.py`` (pre_epoch_process, forward_process, post_forward_process,
  validation, post_epoch_process) without the MetricLogger printing. The teacher runs on
  every batch: torchdistill 1.1.5 has no teacher-output cache. Its optimizer is SGD
  registered through ``torchdistill.optim.registry.register_optimizer`` with kdens'
  parameter groups (its plain 'SGD' key would also decay biases).

Loss conventions: torchdistill's ``KDLoss`` is ``alpha*CE + beta*T^2*KL`` with
``beta = 1 - alpha``, i.e. alpha weights the hard term as in kdens; but with alpha = 0 it
returns the bare KL, without T^2, so for alpha = 0 the sub-term weight is set to T^2.
Before training the script checks that both losses agree on random logits and on a real
batch through the box; it exits non-zero if they differ.

Batches: both samplers draw ``torch.randperm`` from a generator seeded with the run's seed,
so the first epoch's batches are identical; later ones differ (``same_batch_order``).

Needs its own environment (torchdistill needs torchvision, which does not import beside
kdens' torch 2.13.0 CPU wheel; CI never imports torchdistill):

    python3.11 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.14.1 torchvision==0.29.1
    .venv-bench/bin/pip install torchdistill==1.1.5
    .venv-bench/bin/pip install -e .

Runs alternate in one process (kdens first in even repetitions) with the thread count fixed:

    OMP_NUM_THREADS=1 .venv-bench/bin/python bench/bench_torchdistill.py --teacher runs/fm/cnn \
        --student 800,800 --temperature 20 --alpha 0.1 --grad-clip 5 --epochs 15 --reps 1 \
        --out bench/results/torchdistill
    OMP_NUM_THREADS=1 .venv-bench/bin/python bench/bench_torchdistill.py --smoke --out /tmp/td-smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill.config import DistillConfig
from distill.losses import kd_loss
from distill.transfer import stratified_fraction
from kdens import metrics as M
from kdens.artifacts import atomic_write_json, atomic_write_text, read_json, read_manifest
from kdens.data import load_dataset
from kdens.evaluate import evaluate_model
from kdens.models import build_model, load_model
from kdens.train import TrainConfig, default_sampler, lr_at, predict_logits


def kdens_sgd(params, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> torch.optim.SGD:
    """SGD with kdens' groups (``kdens.train._make_optimizer``): no decay on biases and norms."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def td_train_config(tc: TrainConfig, temperature: float, alpha: float, steps_per_epoch: int) -> dict:
    """torchdistill's ``train`` section (its sample YAML as a dict), matching ``tc``."""
    from torch.utils.data import RandomSampler, SequentialSampler

    gen = torch.Generator().manual_seed(tc.seed)  # the example seeds globally; explicit is the same
    return {
        "num_epochs": tc.epochs,
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": RandomSampler,
                                                                 "kwargs": {"generator": gen}},
                              "kwargs": {"batch_size": tc.batch_size, "num_workers": 0, "drop_last": False}},
        "val_data_loader": {"dataset_id": "val", "sampler": {"class_or_func": SequentialSampler, "kwargs": {}},
                            "kwargs": {"batch_size": tc.eval_batch_size, "num_workers": 0}},
        # 1.1.5 has no default forward_proc (older releases fell back to forward_batch_only)
        "teacher": {"sequential": [], "requires_grad": False, "frozen_modules": [],
                    "forward_proc": "forward_batch_only"},
        "student": {"sequential": [], "requires_grad": True, "frozen_modules": [],
                    "forward_proc": "forward_batch_only"},
        "optimizer": {"key": "kdens_sgd", "max_grad_norm": tc.grad_clip,
                      "kwargs": {"lr": tc.resolved_lr, "momentum": tc.momentum,
                                 "weight_decay": tc.resolved_weight_decay, "nesterov": tc.momentum > 0}},
        # stepped after every optimizer step: lr after k steps = base * (1 + cos(pi k / K)) / 2, as lr_at
        "scheduler": {"key": "CosineAnnealingLR", "scheduling_step": 1,
                      "kwargs": {"T_max": tc.epochs * steps_per_epoch, "eta_min": 0.0}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output",
                "teacher_module_path": ".", "teacher_module_io": "output",
                "temperature": temperature, "alpha": alpha, "reduction": "batchmean"}},
            # KDLoss drops T^2 when alpha == 0 (it returns the bare KL): restore kdens' scale
            "weight": temperature ** 2 if alpha == 0 else 1.0}}}},
    }


def check_losses_agree(box, teacher, student, xb: torch.Tensor, yb: torch.Tensor, temperature: float,
                       alpha: float) -> dict:
    """kdens' ``kd_loss`` vs torchdistill's criterion on random logits and on a real batch.

    Random logits test the formulas; the real batch goes through the box's
    ``forward_process`` (forward procs, io dicts, criterion). Both run in float64 (the
    models are cast there and back, which round-trips float32 weights exactly): in
    float32 the T^2 factor magnifies rounding of the small KL (seen: 1.3e-4 relative at
    T=20, alpha=0), which would hide small convention errors behind a loose tolerance.

    Raises:
        SystemExit: the two disagree beyond rtol 1e-9 (then it is not the same job).
    """
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(64, 10, generator=g, dtype=torch.float64) * 5  # (B, C)
    zt = torch.randn(64, 10, generator=g, dtype=torch.float64) * 5  # (B, C)
    y = torch.randint(0, 10, (64,), generator=g)
    io = {"student": {".": {"output": zs}}, "teacher": {".": {"output": zt}}}
    pairs = {"random_logits": (kd_loss(zs, torch.log_softmax(zt, 1), y, temperature, alpha),
                               box.criterion(io, {}, y))}
    params = [p for grp in box.optimizer.param_groups for p in grp["params"]]
    teacher.double(), student.double()
    try:
        with torch.no_grad():
            x64 = xb.double()
            pairs["real_batch"] = (kd_loss(student(x64), torch.log_softmax(teacher(x64), 1), yb, temperature, alpha),
                                   box.forward_process(x64, yb, {}))
    finally:
        teacher.float(), student.float()
    same = {id(p) for p in params} == {id(p) for p in student.parameters()}
    if not same or any(p.dtype != torch.float32 for p in params):
        raise SystemExit("the float64 loss check detached the optimizer from the student's parameters")
    out = {k: [float(a), float(b)] for k, (a, b) in pairs.items()}
    if not all(torch.isclose(a, b, rtol=1e-9, atol=0.0) for a, b in pairs.values()):
        raise SystemExit(f"LOSS MISMATCH [kdens, torchdistill]: {out}; T={temperature}, alpha={alpha}: "
                         "the two sides would not train on the same objective")
    return out


def same_batch_order(n: int, batch_size: int, epochs: int, seed: int) -> list[bool]:
    """Per epoch, whether kdens' sampler and torchdistill's RandomSampler yield the same batches.

    Both draw ``torch.randperm(n)`` from a generator seeded with the run's seed (kdens'
    ``default_sampler``; the RandomSampler gets such a generator in ``td_train_config``),
    so the first epoch's batches are identical. RandomSampler then draws a second
    permutation per epoch (for the remainder of ``num_samples // n``, here empty), so
    later epochs differ (seen with torch 2.14).
    """
    from torch.utils.data import RandomSampler

    sample = default_sampler(n, batch_size)
    g_kdens, g_td = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    td = RandomSampler(range(n), generator=g_td)
    return [torch.equal(torch.cat(list(sample(e, g_kdens))), torch.tensor(list(td))) for e in range(epochs)]


def run_kdens(teacher_dir: Path, data_kw: dict, model_args: dict, tc: TrainConfig, temperature: float,
              alpha: float, fraction: float, workdir: Path) -> dict:
    """One ``kdens distill`` job through its Python API in a fresh folder (cache built inside)."""
    from distill.stage import run

    cfg = DistillConfig(teacher=str(teacher_dir), model="mlp", model_args=model_args, temperature=temperature,
                        alpha=alpha, loss="kd", transfer=f"fraction={fraction}" if fraction < 1 else "train",
                        train=tc, **data_kw)
    wall, cpu = time.perf_counter(), time.process_time()
    run_dir = run(cfg, workdir / "student", progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    m = read_manifest(run_dir, "student")
    metrics, hist = m["metrics"], read_json(run_dir / "history.json")
    return {"wall_seconds": wall, "cpu_seconds": cpu, "epoch_seconds": [r["seconds"] for r in hist],
            "train_seconds": metrics["train_seconds"], "best_epoch": metrics["best_epoch"],
            "test_accuracy": metrics["test_accuracy"], "test_errors": metrics["test_errors"],
            "teacher_test_errors": metrics["teacher_test_errors"], "val_loss": [r["val_loss"] for r in hist],
            "cache_build_seconds": metrics["soft_targets"]["build_seconds"],
            "teacher_soft_targets": {"mode": "cached once (one teacher pass), indexed per step"}}


def _val_pass(model, loader) -> tuple[float, float]:
    """Validation CE and accuracy over torchdistill's val loader (the example's ``evaluate``)."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    with torch.inference_mode():
        for xb, yb in loader:
            z = model(xb)  # (B, C)
            loss += float(F.cross_entropy(z, yb, reduction="sum"))
            correct += int((z.argmax(1) == yb).sum())
            n += len(yb)
    return loss / n, correct / n


def run_torchdistill(teacher_dir: Path, data_kw: dict, model_args: dict, tc: TrainConfig, temperature: float,
                     alpha: float, fraction: float) -> dict:
    """The same job through torchdistill's ``DistillationBox`` and its example's epoch loop."""
    from torch.utils.data import TensorDataset
    from torchdistill.common.main_util import set_seed
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.optim.registry import register_optimizer

    register_optimizer(key="kdens_sgd")(kdens_sgd)  # torchdistill's hook for optimizers of one's own

    wall, cpu = time.perf_counter(), time.process_time()
    data = load_dataset(data_kw["data"], val_fraction=data_kw["val_fraction"], split_seed=data_kw["split_seed"])
    x_tr, y_tr = data.x_train, data.y_train
    if fraction < 1:  # the examples kdens' --transfer fraction=F picks
        keep = stratified_fraction(y_tr, fraction, data_kw["split_seed"])
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    teacher, _ = load_model(teacher_dir)
    set_seed(tc.seed)  # as kdens' stage: the run's seed fixes the student's initial weights
    student = build_model("mlp", data.num_classes, data.input_shape, **model_args)
    datasets = {"train": TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
                "val": TensorDataset(torch.from_numpy(data.x_val), torch.from_numpy(data.y_val))}
    steps = -(-len(y_tr) // tc.batch_size)
    box = get_distillation_box(teacher, student, datasets, td_train_config(tc, temperature, alpha, steps),
                               torch.device("cpu"), None, False, 1)
    n_check = min(tc.batch_size, len(y_tr))
    loss_check = check_losses_agree(box, teacher, student, torch.from_numpy(x_tr[:n_check]),
                                    torch.from_numpy(y_tr[:n_check]), temperature, alpha)
    best = (float("inf"), 0, None)
    epoch_seconds, val_losses, lr_err, step = [], [], 0.0, 0
    for epoch in range(box.num_epochs):
        t = time.perf_counter()
        box.pre_epoch_process(epoch=epoch)
        if teacher.training:
            raise SystemExit("torchdistill put the teacher in train mode: its dropout would change the targets")
        for i, (xb, yb, supp) in enumerate(box.train_data_loader):
            lr_err = max(lr_err, abs(box.optimizer.param_groups[0]["lr"] - lr_at(tc, epoch, i, steps)))
            loss = box.forward_process(xb, yb, supp)
            box.post_forward_process(loss=loss)
            if not torch.isfinite(loss):
                raise SystemExit(f"torchdistill: loss {float(loss)} at epoch {epoch + 1}, step {i + 1}")
            step += 1
        val_loss, _ = _val_pass(student, box.val_data_loader)
        box.post_epoch_process()
        epoch_seconds.append(time.perf_counter() - t)
        val_losses.append(val_loss)
        if not val_loss >= best[0]:  # kdens' rule: keep the epoch of lowest validation CE
            best = (val_loss, epoch + 1, {k: v.detach().clone() for k, v in student.state_dict().items()})
    box.clean_modules()
    last = evaluate_model(student, data, tc.eval_batch_size)
    student.load_state_dict(best[2])
    metrics = evaluate_model(student, data, tc.eval_batch_size)
    # the example evaluates the teacher on the test split too (unless -student_only), as kdens does
    teacher_errors = M.errors(predict_logits(teacher, data.x_test, tc.eval_batch_size).numpy(), data.y_test)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_seconds": wall, "cpu_seconds": cpu, "epoch_seconds": epoch_seconds,
            "train_seconds": sum(epoch_seconds), "best_epoch": best[1],
            "test_accuracy": metrics["test_accuracy"], "test_errors": metrics["test_errors"],
            "last_epoch_test_errors": last["test_errors"], "teacher_test_errors": teacher_errors,
            "val_loss": val_losses, "cache_build_seconds": 0.0,
            "lr_schedule_max_abs_diff_vs_kdens": lr_err,
            "same_batches_as_kdens_per_epoch": same_batch_order(len(y_tr), tc.batch_size, tc.epochs, tc.seed),
            "loss_check": loss_check, "steps": step,
            "teacher_soft_targets": {"mode": "teacher forward on every batch (torchdistill 1.1.5 has no "
                                             "teacher-output cache)"}}


def smoke_teacher(workdir: Path) -> Path:
    """A small digits teacher (mlp 64, 20 epochs, ~2 s) so the smoke run needs no finished run folder."""
    from generalist import stage as generalist
    from kdens.config import GeneralistConfig, build

    cfg = build(GeneralistConfig, {"model": "mlp", "data": "digits", "model_args": {"hidden": [64]},
                                   "epochs": 20, "batch_size": 32, "patience": None,
                                   "device": "cpu"})
    return generalist.run(cfg, workdir / "teacher", progress=False)


def machine() -> dict:
    """What the numbers were measured on."""
    def pkg(name: str) -> str:
        from importlib.metadata import version
        return version(name)

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                         cwd=Path(__file__).resolve().parent).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": pkg("torchvision"), "torchdistill": pkg("torchdistill"),
            "kdens": pkg("kdens"), "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "kdens_git_commit": git}


def summarize(runs: list[dict]) -> dict:
    """Medians over repetitions and the torchdistill / kdens ratios."""
    def med(side: str, key: str) -> float:
        return statistics.median(r[side][key] for r in runs)

    ep = {s: statistics.median(t for r in runs for t in r[s]["epoch_seconds"]) for s in ("kdens", "torchdistill")}
    return {"kdens_wall_seconds": med("kdens", "wall_seconds"),
            "torchdistill_wall_seconds": med("torchdistill", "wall_seconds"),
            "ratio_wall_torchdistill_over_kdens": med("torchdistill", "wall_seconds") / med("kdens", "wall_seconds"),
            "ratio_cpu_torchdistill_over_kdens": med("torchdistill", "cpu_seconds") / med("kdens", "cpu_seconds"),
            "kdens_epoch_seconds_median": ep["kdens"], "torchdistill_epoch_seconds_median": ep["torchdistill"],
            "ratio_epoch_torchdistill_over_kdens": ep["torchdistill"] / ep["kdens"],
            "kdens_test_errors": [r["kdens"]["test_errors"] for r in runs],
            "torchdistill_test_errors": [r["torchdistill"]["test_errors"] for r in runs]}


def markdown(res: dict) -> str:
    """The results page: job, machine, one row per side and repetition, the ratios."""
    s, j, m = res["summary"], res["job"], res["machine"]
    rows = []
    for r in res["runs"]:
        for side in ("kdens", "torchdistill"):
            x = r[side]
            rows.append(f"| {r['rep']} | {side} | {x['wall_seconds']:.1f} | {x['cpu_seconds']:.1f} | "
                        f"{x['train_seconds']:.1f} | {x['cache_build_seconds']:.1f} | "
                        f"{statistics.median(x['epoch_seconds']):.2f} | {x['test_accuracy']:.4f} | "
                        f"{x['test_errors']} | {x['best_epoch']} | {x['teacher_soft_targets']['mode']} |")
    job = (f"Job: teacher `{j['teacher']}`, student mlp {j['student']}, data {j['data']} (training share "
           f"{j['fraction']}, val fraction {j['val_fraction']}, split seed {j['split_seed']}), {j['epochs']} "
           f"epochs, batch {j['batch_size']}, SGD lr {j['lr']} Nesterov 0.9 cosine per step, weight decay "
           f"{j['weight_decay']} (weights only), grad clip {j['grad_clip']}, T={j['temperature']}, "
           f"alpha={j['alpha']}, seeds {j['seeds']}, CPU; both keep the epoch of lowest validation CE.")
    mach = (f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), torch {m['torch']}, torchvision {m['torchvision']}, "
            f"torchdistill {m['torchdistill']}, kdens {m['kdens']} ({m['kdens_git_commit'][:10]}), torch threads "
            f"{m['torch_threads']}, OMP_NUM_THREADS={m['OMP_NUM_THREADS']}, load average before "
            f"{res['loadavg_before']}, after {res['loadavg_after']}.")
    total = ("Total = load data and teacher, (kdens) build the soft-target cache, the epochs (training plus a "
             "validation pass each), test evaluation of student and teacher, (kdens) write the run folder. "
             f"Teacher test errors: {res['runs'][0]['kdens']['teacher_test_errors']}.")
    ratio = (f"torchdistill / kdens: wall **{s['ratio_wall_torchdistill_over_kdens']:.2f}x**, CPU "
             f"{s['ratio_cpu_torchdistill_over_kdens']:.2f}x, per epoch "
             f"{s['ratio_epoch_torchdistill_over_kdens']:.2f}x "
             "(medians over repetitions). kdens builds the soft-target cache once (one teacher pass); "
             "torchdistill runs the teacher on every batch of every epoch.")
    checks = "; ".join(
        f"rep {r['rep']}: loss kdens/torchdistill {r['torchdistill']['loss_check']['real_batch'][0]:.10g} / "
        f"{r['torchdistill']['loss_check']['real_batch'][1]:.10g} (float64, one real batch), LR max |diff| "
        f"{r['torchdistill']['lr_schedule_max_abs_diff_vs_kdens']:.1e}, epochs with the same batches as kdens "
        f"{sum(r['torchdistill']['same_batches_as_kdens_per_epoch'])} of {j['epochs']}" for r in res["runs"])
    header = ("| rep | side | wall s (total) | CPU s | epochs s (sum) | cache build s | epoch s (median) "
              "| test accuracy | test errors | best epoch | teacher soft targets |")
    return "\n".join(["# kdens vs torchdistill: the same KD job", "", f"Command: `{res['command']}`", "",
                      job, "", mach, "", header, "|---" * 11 + "|", *rows, "", total, "", ratio, "",
                      f"Same-job checks: {checks}.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, default=Path("runs/fm/cnn"), help="kdens teacher run folder")
    ap.add_argument("--student", default="800,800", help="student mlp hidden sizes")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=20.0)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=5.0, help="global grad-norm clip, both sides (0: off)")
    ap.add_argument("--fraction", type=float, default=1.0,
                    help="distill on this class-stratified share of the training split (kdens fraction=F)")
    ap.add_argument("--seed", type=int, default=0, help="seed of repetition 0; repetition r uses seed + r")
    ap.add_argument("--reps", type=int, default=1, help="alternating kdens/torchdistill pairs")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--smoke", action="store_true", help="tiny job: digits, own mlp-64 teacher, mlp 32, 2 epochs")
    ap.add_argument("--out", type=Path, default=Path("bench/results/torchdistill"), help="writes OUT.json, OUT.md")
    args = ap.parse_args()
    try:
        import torchdistill  # noqa: F401  (fail before the kdens run, not after it)
    except ImportError:
        raise SystemExit("torchdistill is not installed in this environment; run this script with "
                         ".venv-bench/bin/python (install commands: this file's docstring)") from None
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.smoke:
            args.teacher, args.student, args.epochs, args.batch_size = smoke_teacher(tmp), "32", 2, 64
        data_cfg = read_manifest(args.teacher, ("generalist", "student"))["config"]
        data_kw = {"data": data_cfg.get("data", "digits"), "val_fraction": float(data_cfg.get("val_fraction", 0.1)),
                   "split_seed": int(data_cfg.get("split_seed", 0))}  # the teacher's, as kdens distill resolves
        model_args = {"hidden": [int(h) for h in args.student.split(",")]}
        load = os.getloadavg()
        runs = []
        for rep in range(args.reps):
            tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, grad_clip=args.grad_clip or None,
                             patience=None, device="cpu", seed=args.seed + rep)
            order = ("kdens", "torchdistill") if rep % 2 == 0 else ("torchdistill", "kdens")
            rec = {"rep": rep, "seed": tc.seed, "order": list(order)}
            for side in order:
                if side == "kdens":
                    rec[side] = run_kdens(args.teacher, data_kw, model_args, tc, args.temperature, args.alpha,
                                          args.fraction, tmp / f"rep{rep}")
                else:
                    rec[side] = run_torchdistill(args.teacher, data_kw, model_args, tc, args.temperature,
                                                 args.alpha, args.fraction)
                print(f"rep {rep} {side}: {rec[side]['wall_seconds']:.1f} s, test errors "
                      f"{rec[side]['test_errors']}", flush=True)
            runs.append(rec)
    tc0 = TrainConfig(grad_clip=args.grad_clip or None)
    result = {
        "command": " ".join(["OMP_NUM_THREADS=" + str(os.environ.get("OMP_NUM_THREADS")), sys.executable,
                             *sys.argv]),
        "job": {"teacher": str(args.teacher), "student": args.student, **data_kw, "fraction": args.fraction,
                "epochs": args.epochs, "batch_size": args.batch_size, "lr": tc0.resolved_lr,
                "weight_decay": tc0.resolved_weight_decay, "grad_clip": tc0.grad_clip,
                "temperature": args.temperature, "alpha": args.alpha,
                "seeds": [r["seed"] for r in runs], "selection": "epoch of lowest validation CE, both sides"},
        "machine": machine(), "loadavg_before": [round(v, 2) for v in load],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()], "runs": runs, "summary": summarize(runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(f"{args.out}.json"), result)  # not with_suffix: --out may contain a dot
    atomic_write_text(Path(f"{args.out}.md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
