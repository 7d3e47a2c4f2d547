"""The ``spnas`` command line (:func:`spnas.cli.main.main`)."""
