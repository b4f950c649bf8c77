"""``python -m mach`` runs the command line."""

from mach.cli import main

main()
