"""``python -m kdens`` runs the command line."""

from kdens.app.cli import main

main()
