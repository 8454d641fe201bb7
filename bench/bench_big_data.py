"""Data bigger than memory: peak RSS training from a memory-mapped .npy folder, and image-folder throughput.

1. Writes an .npy folder of uint8 32x32 grey images (10 classes, a bright row per class over
   noise), generated in chunks straight into ``numpy.lib.format.open_memmap`` files, by default
   2 GiB of training images, then trains an MLP for one epoch from it with
   ``kdens train-generalist`` in a child process and reads that process's peak resident set
   (``VmHWM`` of ``/proc/self/status``, the kernel's high-water mark, read as it exits). For scale it measures the same
   command on a small slice of the data twice, once as an .npy folder (memory-mapped) and once
   as an .npz (in memory), and a process that only imports torch and kdens.
2. Loads the same images as an image folder (PNG files, decoded with Pillow) and as an .npz
   with ``kdens.data.load_dataset`` and reports images per second for both, side by side.

Everything is written under ``--work`` (default a temp folder) and deleted afterwards.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_big_data.py --out bench/results/big-data
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDE, CLASSES = 32, 10


def images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 32, 32) noise with a bright row 3*class, and the labels."""
    y = rng.integers(0, CLASSES, n)
    x = rng.integers(0, 100, (n, SIDE, SIDE), dtype=np.uint8)
    x[np.arange(n), 3 * y, :] = 230
    return x, y.astype(np.int64)


def write_npy_folder(folder: Path, n_train: int, n_test: int, seed: int = 0, chunk: int = 65536) -> int:
    """The four .npy files, images generated chunk by chunk and appended with plain writes (writing
    through a memory map would put the whole file in this process's resident set, and a child
    forked from it starts with that high-water mark); returns bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        path = folder / f"x_{split}.npy"
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, SIDE, SIDE))
        offset = header.offset
        del header  # only the header was written; the data follows with plain writes
        y = np.empty(n, np.int64)
        with open(path, "r+b") as f:
            f.seek(offset)
            for i in range(0, n, chunk):
                xb, yb = images(min(chunk, n - i), rng)
                f.write(xb.tobytes())
                y[i:i + len(xb)] = yb
        np.save(folder / f"y_{split}.npy", y)
    return sum(f.stat().st_size for f in folder.iterdir())


HWM = """
import atexit, os, runpy, sys
def _hwm():
    status = open("/proc/self/status").read()
    open(os.environ["KDENS_BENCH_HWM"], "w").write(status.split("VmHWM:")[1].split()[0])
atexit.register(_hwm)
sys.argv = ["kdens", *sys.argv[1:]]
runpy.run_module("kdens", run_name="__main__")
"""


def peak_rss(cmd: list[str], hwm_file: Path) -> tuple[int, float, int]:
    """(peak RSS in bytes, wall seconds, exit code) of ``cmd`` (kdens arguments, or python code with
    ``-c``) run as a child process: its own VmHWM, read from /proc/self/status as it exits."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "KDENS_BENCH_HWM": str(hwm_file)}
    full = [sys.executable, "-c", HWM, *cmd] if cmd[0] != "-c" else [sys.executable, "-c", cmd[1] + "\n" + HWM_ONLY]
    t0 = time.perf_counter()
    proc = subprocess.run(full, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    return int(hwm_file.read_text()) * 1024, time.perf_counter() - t0, proc.returncode  # VmHWM is in kB


HWM_ONLY = HWM.split("sys.argv")[0] + "_hwm()\n"


def train_cmd(data: Path, out: Path, batch_size: int) -> list[str]:
    return ["train-generalist", "--data", str(data), "--model", "mlp",
            "--model-arg", "hidden=32", "--epochs", "1", "--batch-size", str(batch_size), "--val-fraction", "0.01",
            "--device", "cpu", "--quiet", "--out", str(out)]


def throughput(work: Path, n: int, repeats: int) -> dict:
    """Images per second: an image folder of PNGs vs the same images as an .npz, via load_dataset."""
    from PIL import Image

    from kdens.data import load_dataset

    rng = np.random.default_rng(1)
    x, y = images(n, rng)
    folder = work / "png"
    for c in range(CLASSES):
        (folder / f"c{c}").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(x[i]).save(folder / f"c{y[i]}" / f"{i:06d}.png")
    npz = work / "same.npz"
    cut = n * 4 // 5
    np.savez(npz, x_train=x[:cut], y_train=y[:cut], x_test=x[cut:], y_test=y[cut:])
    out = {"images": n, "png_bytes": sum(f.stat().st_size for f in folder.rglob("*.png")),
           "npz_bytes": npz.stat().st_size}
    for name, spec in (("image_folder", folder), ("npz", npz)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ds = load_dataset(str(spec))
            times.append(time.perf_counter() - t0)
            assert len(ds.y_train) + len(ds.y_val) + len(ds.y_test) == n
        out[name] = {"seconds_median": float(np.median(times)), "images_per_second": n / float(np.median(times)),
                     "repeats": repeats}
    out["npz_over_folder"] = out["npz"]["images_per_second"] / out["image_folder"]["images_per_second"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-rows", type=int, default=2 * 1024 * 1024, help="training images (1 KiB each)")
    p.add_argument("--test-rows", type=int, default=20000)
    p.add_argument("--small-rows", type=int, default=200000, help="the slice trained from .npy and from .npz")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--png-images", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (deleted afterwards)")
    p.add_argument("--out", type=Path, default=None, help="results prefix: writes PREFIX.json and PREFIX.md")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kdens-big-", dir=a.work))
    res: dict = {"argv": sys.argv[1:], "cpu_threads": 1}
    try:
        t0 = time.perf_counter()
        big = work / "big"
        res["file_bytes"] = write_npy_folder(big, a.train_rows, a.test_rows)
        res["write_seconds"] = time.perf_counter() - t0
        floor, _, _ = peak_rss(["-c", "import torch, kdens.app.cli, kdens.data"], work / "hwm")
        res["import_floor_rss"] = floor
        rss, secs, rc = peak_rss(train_cmd(big, work / "run-big", a.batch_size), work / "hwm")
        metrics = json.loads((work / "run-big" / "metrics.json").read_text()) if rc == 0 else {}
        res["mapped_big"] = {"rows": a.train_rows, "peak_rss": rss, "seconds": secs, "exit": rc,
                             "test_accuracy": metrics.get("test_accuracy")}
        shutil.rmtree(big)
        small = work / "small"
        res["small_bytes"] = write_npy_folder(small, a.small_rows, a.test_rows, seed=2)
        npz = work / "small.npz"
        np.savez(npz, **{k: np.load(small / f"{k}.npy") for k in ("x_train", "y_train", "x_test", "y_test")})
        for name, spec in (("mapped_small", small), ("in_memory_small", npz)):
            rss, secs, rc = peak_rss(train_cmd(spec, work / f"run-{name}", a.batch_size), work / "hwm")
            res[name] = {"rows": a.small_rows, "peak_rss": rss, "seconds": secs, "exit": rc}
        shutil.rmtree(small)
        npz.unlink()
        res["throughput"] = throughput(work, a.png_images, a.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(res)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_name(a.out.name + ".json").write_text(json.dumps(res, indent=2) + "\n")
        a.out.with_name(a.out.name + ".md").write_text(text + "\n")
    return 0 if all(res[k]["exit"] == 0 for k in ("mapped_big", "mapped_small", "in_memory_small")) else 1


def report(res: dict) -> str:
    mib = 1 << 20
    big = res["mapped_big"]
    rows = [f"| .npy folder, memory-mapped | {big['rows']:,} | {res['file_bytes'] / mib:,.0f} | "
            f"{big['peak_rss'] / mib:,.0f} | {res['file_bytes'] / big['peak_rss']:.1f}x | {big['seconds']:.0f} |"]
    for name, what in (("mapped_small", ".npy folder, memory-mapped"), ("in_memory_small", ".npz, in memory")):
        r = res[name]
        rows.append(f"| {what} | {r['rows']:,} | {res['small_bytes'] / mib:,.0f} | {r['peak_rss'] / mib:,.0f} | "
                    f"{res['small_bytes'] / r['peak_rss']:.2f}x | {r['seconds']:.0f} |")
    t = res["throughput"]
    return "\n".join([
        "| data | training images | file MiB | peak RSS MiB | file / RSS | wall s |",
        "|---|---|---|---|---|---|", *rows, "",
        f"Importing torch and kdens alone: peak RSS {res['import_floor_rss'] / mib:,.0f} MiB. "
        f"One epoch from the {res['file_bytes'] / (1 << 30):.1f} GiB set reached test accuracy {big['test_accuracy']}.", "",
        "| source | images | images/s (median of "
        f"{t['npz']['repeats']}) |", "|---|---|---|",
        f"| image folder (PNG, Pillow) | {t['images']:,} | {t['image_folder']['images_per_second']:,.0f} |",
        f"| same images as .npz | {t['images']:,} | {t['npz']['images_per_second']:,.0f} |",
    ])


if __name__ == "__main__":
    sys.exit(main())
