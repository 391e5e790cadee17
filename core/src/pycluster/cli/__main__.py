"""``python -m pycluster.cli`` runs the ``pycluster`` command."""

from .main import main

main()
