from pathlib import Path

from kdens.app.cli_docs import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_is_current():
    assert DOC.exists(), "docs/cli.md missing: run python -m kdens.app.cli_docs > docs/cli.md"
    assert DOC.read_text() == render(), "docs/cli.md is stale: run python -m kdens.app.cli_docs > docs/cli.md"
