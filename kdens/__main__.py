"""``python -m kdens`` runs the command line."""

from kdens.cli import main

main()
