"""Pieces every ``kdens`` subcommand shares: context settings, option groups, config layering.

Kept apart from ``kdens/app/cli.py`` so the per-stage command modules can import them
without importing the group that registers those modules (which would be circular).
"""

from __future__ import annotations

from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def train_options(f):
    """Flags of the shared training loop; each overrides the config file when given."""
    opts = [
        click.option("--epochs", type=click.IntRange(min=1), help="Passes over the training data [20]."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Examples per step [128]."),
        click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), help="Optimizer [sgd]."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True),
                     help="Peak learning rate [0.05 sgd, 1e-3 adamw]."),
        click.option("--momentum", type=click.FloatRange(0, 1), help="SGD momentum [0.9]."),
        click.option("--weight-decay", type=click.FloatRange(min=0), help="Weight decay [5e-4 sgd, 1e-2 adamw]."),
        click.option("--schedule", type=click.Choice(["cosine", "step", "none"]), help="LR schedule [cosine]."),
        click.option("--max-norm", type=click.FloatRange(min=0, min_open=True),
                     help="Max L2 norm of each unit's incoming weights [off]."),
        click.option("--grad-clip", type=click.FloatRange(min=0, min_open=True),
                     help="Clip the gradient's global L2 norm to this [off]; use it for distillation at high T."),
        click.option("--jitter", type=click.IntRange(min=0), help="Random translation, pixels [0]."),
        click.option("--augment", type=str,
                     help="Augmentations, comma-separated: crop (reflect-pad by min(H,W)/8 px, random "
                          "crop back), flip (left-right, p=1/2), mixup[=A] (blend each batch with a shuffled "
                          "copy, lambda ~ Beta(A,A), A=1; labels weighted alike; features too); "
                          "e.g. --augment crop,flip [none]."),
        click.option("--patience", type=click.IntRange(min=1), help="Stop after N epochs without a lower validation loss [off: every epoch runs, the best is kept]."),
        click.option("--device", type=str, help="auto, cpu or cuda [auto]."),
        click.option("--amp/--no-amp", default=None, help="bf16 autocast on CUDA [on]."),
        click.option("--seed", type=int, help="Seed for init, shuffling, jitter, dropout [0]."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def data_options(f):
    opts = [
        click.option("--data", type=str,
                     help="digits, mnist, fashion-mnist (fetched once into $KDENS_DATA, default "
                          "~/.cache/kdens), a folder of IDX files, an image folder (DIR/<class>/*.png, "
                          "or DIR/train/ and DIR/test/), an .npz, a folder of x_train.npy, y_train.npy, x_test.npy, "
                          "y_test.npy (read memory-mapped), or a CSV (train.csv or train.csv,test.csv) "
                          "[digits]."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True),
                     help="Validation share of the training set [0.1]."),
        click.option("--split-seed", type=int, help="Seed of the validation and test splits [0]."),
        click.option("--layout", type=click.Choice(["auto", "nchw", "nhwc", "features"]),
                     help="How the arrays are laid out; auto decides only unambiguous shapes [auto]."),
        click.option("--label-column", type=str, help="A CSV's label column [the last one]."),
        click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     help="Test share carved (seeded, stratified) from a CSV or image folder without one [0.2]."),
        click.option("--image-size", type=str, metavar="H,W", help="Resize an image folder's images to H,W."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def model_options(f):
    f = click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                     help="Model argument, repeatable: hidden=1200,1200 dropout=0.5.")(f)
    return click.option("--model", type=str, help="mlp, cnn, lenet5, mobilenet or package.module:factory.")(f)


def run_options(f):
    opts = [
        click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
                     help="TOML file with the same keys as the flags; flags override it."),
        click.option("--out", type=click.Path(path_type=Path, file_okay=False), help="Run folder to write."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run in --out."),
        click.option("--force", is_flag=True, help="Overwrite a finished run in --out."),
        click.option("--quiet", is_flag=True, help="No progress (bars on a terminal, one line per epoch in a log)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


RUN_KEYS = ("config_file", "out", "resume", "force", "quiet")
NOT_IN_FILES = ("config_file", "resume", "force", "quiet")
"""Flags that say how to run this once, not what to make: a config file cannot set them."""


def layers(config_file: Path | None, names: tuple[str, ...], flags: dict) -> tuple[dict, dict, Path | None]:
    """(file layer, flag layer, out) for config.build; flags left unset are dropped.

    ``flags`` are the command's parameters (what ``--help`` shows); a config file may set
    any of them but ``NOT_IN_FILES``, ``out`` included, and each flag given overrides it.
    """
    from kdens.config import key_name, load_toml, norm_key, section
    from kdens.errors import ConfigError

    file_layer = section(load_toml(config_file), names) if config_file else {}
    settable = {k for k in flags if k not in NOT_IN_FILES}
    for raw in file_layer:
        if norm_key(raw) not in settable:
            valid = ", ".join(sorted(key_name(k) for k in settable))
            raise ConfigError(f"--config {config_file}: unknown config key {raw!r}; valid keys (the flags of "
                              f"--help, with '-' or '_'): {valid}")
    file_out = next((file_layer.pop(k) for k in list(file_layer) if norm_key(k) == "out"), None)
    out = flags.pop("out", None) or file_out  # a flag overrides the file, as for every other key
    flag_layer = {k: v for k, v in flags.items() if v is not None and v != () and k not in RUN_KEYS}
    if not out:
        raise click.UsageError("--out is required (or 'out' in the config file)")
    return file_layer, flag_layer, Path(out)



def print_metrics(run_dir: Path, keys=("test_accuracy", "test_errors", "val_accuracy", "train_seconds")):
    from kdens.artifacts import read_json

    from kdens.train import early_stop_note

    m = read_json(run_dir / "metrics.json")

    def value(k):
        if k == "gap_recovered" and m.get(k) is None and m.get("gap_recovered_note"):
            return "n/a"
        return f"{m[k]:.4f}" if isinstance(m.get(k), float) else m.get(k)
    click.echo(f"{run_dir}: " + "  ".join(f"{k}={value(k)}" for k in keys if k in m))
    if "gap_recovered" in keys and m.get("gap_recovered_note"):
        click.echo(f"gap_recovered n/a: {m['gap_recovered_note']}")
    note = early_stop_note(m)
    if note:
        click.echo(f"note: {note}")
