"""``python -m spnas`` is the ``spnas`` command."""
from .cli import main

raise SystemExit(main())
