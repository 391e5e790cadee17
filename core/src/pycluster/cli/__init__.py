"""The ``pycluster`` command line (click), assembled in `pycluster.cli.main.main`."""
