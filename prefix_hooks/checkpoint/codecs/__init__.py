"""Built-in codecs: every module in this package is imported and registers its codec on import
(``register_codec(...)`` at module level), like :mod:`prefix_hooks.families`."""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
