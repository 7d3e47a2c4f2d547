"""``python -m spnas`` is the ``spnas`` command."""
from .cli.main import main

raise SystemExit(main())
