"""``kdens run`` and ``kdens report``: thin click wrappers over kdens.app.plan / kdens.app.pipeline / kdens.app.report."""

from __future__ import annotations

from pathlib import Path

import click

from kdens.app.cli_common import CONTEXT


@click.command("run", context_settings=CONTEXT)
@click.argument("config_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--from", "from_stage", metavar="STAGE",
              help="Redo this stage and everything after it (a stage name, or a kind: generalist, ensemble, "
                   "specialists, distill, deploy, bench).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Experiment folder [the file's 'out', else runs/<name>].")
@click.option("--dry-run", is_flag=True, help="Print what would be reused and what would run, then stop.")
@click.option("--quiet", is_flag=True, help="No training progress (the per-stage lines stay).")
def run_cmd(config_file, from_stage, out, dry_run, quiet):
    """Run a whole pipeline from one TOML file: teachers, students, deploy, bench, report.

    \b
    Stages whose config and inputs are unchanged since the last run are reused; a changed
    stage is redone and so is everything downstream of it; an interrupted run continues
    where it stopped. The report (report.md, report/*.png, report.html) is written last.
    Exit 0 when everything passes; 1 when a deploy gate fails (after bench and the report)
    or a stage's training fails (the pipeline stops there); 2 on bad input.
    \b
    Examples:
      kdens run examples/digits.toml
      kdens run examples/fashion-mnist.toml --from distill
      kdens run examples/digits.toml --dry-run
    """
    from kdens.app.pipeline import run_pipeline
    from kdens.app.plan import load_plan

    plan = load_plan(config_file, out=out)
    click.echo(f"experiment {plan.name}: {len(plan.stages)} stages -> {plan.exp_dir}")
    run_pipeline(plan, from_stage=from_stage, progress=not quiet, dry_run=dry_run, log=click.echo)


@click.command("report", context_settings=CONTEXT)
@click.argument("exp_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--html/--no-html", default=True, show_default=True,
              help="Also write report.html, one self-contained file (plots embedded).")
def report_cmd(exp_dir, html):
    """Regenerate an experiment's report from its folder (written by kdens run).

    \b
    Example:
      kdens report runs/digits
    """
    from kdens.app.report import write_report

    path = write_report(exp_dir, html=html)
    click.echo(f"report: {path}" + (f" and {path.with_suffix('.html')}" if html else ""))
