"""Every command README.md, docs/*.md and examples/ show runs as written (helpers: tests/docs_harness.py).

make test: the static checks below for every document, and the commands on the embedded digits
data; make test-all (``-m slow``): every document top to bottom, Fashion-MNIST included when the
Debian dataset is installed.
"""

from __future__ import annotations

import re
import tomllib

import click
import pytest

from tests import docs_harness as H

DOCS = H.documents()


def test_the_documents_have_their_commands():
    counts = {doc: sum(s.kind == "command" for s in steps) for doc, steps in DOCS.items()}
    assert counts["README.md"] >= 20 and counts["docs/cli.md"] >= 25, counts
    assert all(counts[f"examples/{p.name}"] >= 1 for p in H.EXAMPLES), counts
    makes = [s.text.split("#")[0].strip() for s in DOCS["README.md"] if s.kind == "make"]
    assert makes == ["make demo", "make test"], makes  # listed, not run: they build a venv


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_command_parses(doc):
    from kdens.app.cli import cli

    for step in DOCS[doc]:
        args = H._kdens_args(step.text)
        if args is None:
            continue
        cmd = cli.commands.get(args[0])
        assert cmd is not None, f"{step.source}: no command {args[0]!r}"
        try:
            cmd.make_context(args[0], args[1:], parent=click.Context(cli, info_name="kdens"))
        except click.BadParameter as e:
            assert "does not exist" in str(e), f"{step.source}: {e}"  # folders made by earlier commands
        except click.UsageError as e:
            pytest.fail(f"{step.source}: `{step.text}`: {e}")


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_no_output_collides_and_no_folder_is_used_before_it_is_made(doc):
    made: dict[str, str] = {}
    for step in DOCS[doc]:
        reads, makes = H.reads_and_makes(step.text)
        for r in reads:
            assert H._under(r, made) or (H.REPO / r).exists(), f"{step.source}: reads {r} before any command makes it"
        for m in makes:
            if not step.text.startswith("kdens run "):  # kdens run reuses its folder by design
                assert m not in made, f"{step.source}: --out {m} was already made at {made[m]}"
            made.setdefault(m, step.source)


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_toml_blocks_parse_and_a_command_names_each(doc):
    for step in DOCS[doc]:
        if step.kind == "toml":
            tomllib.loads(step.text)
            assert step.config_name, f"{step.source}: a toml block no later --config FILE names"


def test_every_example_pipeline_plans():
    from kdens.app.plan import load_plan

    for path in H.EXAMPLES:
        if path.suffix == ".toml":
            plan = load_plan(path)
            assert plan.stages, path
    used = " ".join(p.read_text() for p in H.EXAMPLES if p.suffix == ".toml")
    readme = (H.REPO / "README.md").read_text()
    for path in H.EXAMPLES:
        if path.suffix == ".py":  # a model factory a pipeline uses, or a script the README runs
            assert f'"{path.stem}:' in used or f"examples/{path.name}" in readme, f"{path.name}: nothing uses it"


def test_no_document_points_outside_the_repository():
    for path in [*H.DOCS, *H.EXAMPLES]:
        text = path.read_text()
        for target in re.findall(r"\]\(([^)#]+)", text):  # Markdown links
            if "://" in target:
                continue
            resolved = (path.parent / target).resolve()
            assert resolved.is_relative_to(H.REPO) and resolved.exists(), f"{path.name}: link {target}"
        for bad in re.findall(r"(?:\.\./shared\S*|/work/\S+|/home/\S+|[A-Z]+\.md)", text):
            if bad.endswith(".md") and (H.REPO / bad).exists():
                continue
            pytest.fail(f"{path.relative_to(H.REPO)}: points at {bad}, which a clone does not have")


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_docs_run_on_digits(doc, tmp_path):
    """The cheap tier: every command on the embedded digits data that is not a whole pipeline."""
    outcomes = H.run_steps(doc, DOCS[doc], tmp_path, "cheap", timeout=600)
    print("\n".join(f"{o.step.source}: {o.status} {o.detail}" for o in outcomes))


@pytest.mark.slow
@pytest.mark.parametrize("doc", sorted(DOCS))
def test_docs_run_top_to_bottom(doc, tmp_path):
    """The full tier, before each release: every command, Fashion-MNIST ones when it is installed."""
    outcomes = H.run_steps(doc, DOCS[doc], tmp_path, "full")
    print("\n".join(f"{o.step.source}: {o.status} {o.detail} {o.seconds or ''}" for o in outcomes))
