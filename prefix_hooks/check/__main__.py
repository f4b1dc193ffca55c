"""``python -m prefix_hooks.check``: see :mod:`prefix_hooks.check.cli`."""

from prefix_hooks.check.cli import main

raise SystemExit(main())
