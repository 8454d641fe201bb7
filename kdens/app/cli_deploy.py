"""``kdens deploy`` and ``kdens bench``: thin click wrappers over deploy/."""

from __future__ import annotations

from pathlib import Path

import click

from kdens.app.cli_common import CONTEXT

_INTS = "comma-separated positive integers"


@click.command("deploy", context_settings=CONTEXT)
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="A finished generalist or student run folder.")
@click.option("--target", required=True, type=click.Choice(["onnx", "tflite", "fpga"]), help="Export target.")
@click.option("--quantize", type=click.Choice(["none", "int8", "dynamic"]), default="none", show_default=True,
              help="onnx/tflite precision: float, static int8 (calibrated), or dynamic int8 (ONNX MLPs).")
@click.option("--precision", type=str, default=None,
              help="fpga fixed-point type, e.g. 'ap_fixed<16,6>' or 'ap_fixed<8,3,AP_RND_CONV,AP_SAT>'.")
@click.option("--sweep", type=str, default=None,
              help="fpga: also report accuracy at these widths, e.g. '16,6;12,4;10,4;8,3'.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help="fpga: fail when the C simulation's top-1 agreement with PyTorch is below this [0.9].")
@click.option("--io", type=click.Choice(["float", "int8"]), default="float", show_default=True,
              help="tflite int8: float I/O with int8 inside, or int8 in/out.")
@click.option("--batch-sizes", default="1,32", show_default=True, help=f"Batch sizes to measure ({_INTS}).")
@click.option("--threads", default=None, help=f"Thread counts to measure ({_INTS}) [1 and all cores].")
@click.option("--calib-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Calibration examples (seeded sample of the training split).")
@click.option("--max-latency-ms", type=click.FloatRange(min=0, min_open=True),
              help="Budget for batch-1, single-thread p90 latency; exit 1 if missed.")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0),
              help="Budget in accuracy points below PyTorch float; exit 1 if missed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sample.")
@click.option("--tflite-runtime-venv", default=None, metavar="PATH|none",
              help="Venv of the tflite-runtime 2.14 cross-check (`make setup` makes it) "
                   "[$KDENS_TFLITE_RUNTIME_VENV, else ~/.cache/kdens/venv-tflite-runtime if present]; "
                   "'none' skips the check.")
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Deploy folder; this export goes to OUT/<target>-<precision>/.")
@click.option("--force", is_flag=True, help="Export again over a finished OUT/<target>-<precision>/.")
def deploy_cmd(model_dir, target, quantize, precision, sweep, min_agreement, io, batch_sizes, threads, calib_size,
               max_latency_ms, max_accuracy_drop, seed, tflite_runtime_venv, out, force):
    """Export a trained model, check it on the runtime that will run it, and gate it.

    \b
    Every export is checked: structure, parity with PyTorch on real test inputs, test
    accuracy, and latency p50/p90/p99 per batch size and thread count. Exit 0 when all
    gates pass, 1 when a gate fails (the artifact is kept), 2 on bad input.
    \b
    Examples:
      kdens deploy --model runs/fm/student --target onnx --quantize int8 \\
          --max-latency-ms 0.5 --max-accuracy-drop 0.5 --out runs/fm/deploy
      kdens deploy --model runs/fm/student --target tflite --quantize int8 --batch-sizes 1,32 --out runs/fm/deploy
      kdens deploy --model runs/fm/student --target fpga --precision 'ap_fixed<16,6>' --out runs/fm/deploy
    """
    from deploy.common import DeployOptions
    from deploy.config import DeployConfig
    from deploy.stage import run

    opts = DeployOptions(quantize=quantize, batch_sizes=batch_sizes, threads=threads or None, io=io,
                         calib_size=calib_size, max_latency_ms=max_latency_ms, max_accuracy_drop=max_accuracy_drop,
                         seed=seed, tflite_runtime_venv=tflite_runtime_venv)
    cfg = DeployConfig(model=str(model_dir), target=target, precision=precision, sweep=sweep,
                       min_agreement=min_agreement, opts=opts)
    out_dir = run(cfg, Path(out) / cfg.folder_name(), force=force)
    click.echo((out_dir / "report.md").read_text())


@click.command("bench", context_settings=CONTEXT)
@click.argument("deploy_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--threads", default="1", show_default=True, help=f"Thread counts to measure ({_INTS}).")
@click.option("--batch-sizes", default="1,32", show_default=True, help=f"Batch sizes to measure ({_INTS}).")
@click.option("--import", "imports", multiple=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Merge a device's edge_runner result JSON into the table (repeatable).")
@click.option("--bundle", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write a self-contained .tar.gz to run on a Pi/phone-class device.")
@click.option("--no-measure", is_flag=True, help="Use the latencies recorded at deploy time instead of re-timing.")
def bench_cmd(deploy_dir, threads, batch_sizes, imports, bundle, no_measure):
    """One table across everything deployed in DEPLOY_DIR, with the accuracy/latency Pareto front.

    \b
    Every ONNX/TFLite artifact and the PyTorch eager baseline are timed side by side in
    this process, in 30 interleaved rounds; rows are ranked by their quiet p50 (what a
    call costs when nothing disturbs it), rows not measurably slower than the fastest
    are named, and the table says how busy other processes kept the CPUs meanwhile.
    Writes bench.json, bench.md and bench.png into DEPLOY_DIR.
    \b
    Examples:
      kdens bench runs/fm/deploy --threads 1,2 --batch-sizes 1,32
      kdens bench runs/fm/deploy --bundle edge.tar.gz
      kdens bench runs/fm/deploy --no-measure --import pi-results.json
    """
    from deploy.bench_stage import BenchConfig, run

    cfg = BenchConfig(threads=threads, batch_sizes=batch_sizes, imports=tuple(map(str, imports)),
                      bundle=str(bundle) if bundle else None, measure=not no_measure)
    out_dir = run(cfg, deploy_dir)
    click.echo((out_dir / "bench.md").read_text())
    if bundle:
        click.echo(f"bundle: {bundle}  (on the device: tar xzf it, then cd kdens-bundle and run "
                   "python3 edge_runner.py --bundle . --out result.json)")
