"""Import paths that moved in 0.2 and keep working until 0.3, with a :class:`DeprecationWarning`.

0.2 put the shared machinery in :mod:`prefix_hooks.core` and prefix tuning in its own package,
:mod:`prefix_hooks.prefix` (see CHANGELOG.md). ``import prefix_hooks.config`` and the other old
module paths below still work: a finder on ``sys.meta_path`` answers them with the module that
now holds the code (one warning per old path), and ``prefix_hooks.prefix.<name>`` still finds the
names the old ``prefix_hooks.prefix`` module had. Everything public is also in ``prefix_hooks``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import pkgutil
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

REMOVED_IN = "0.3"

MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "prefix_hooks.config": ("prefix_hooks.core.config", "prefix_hooks.prefix.config"),
    "prefix_hooks.attachment": ("prefix_hooks.core.attachment",),
    "prefix_hooks.compose": ("prefix_hooks.core.compose",),
    "prefix_hooks.compiled": ("prefix_hooks.core.compiled",),
    "prefix_hooks.devices": ("prefix_hooks.core.devices",),
    "prefix_hooks.disabled_blocks": ("prefix_hooks.core.disabled_blocks",),
    "prefix_hooks.legacy_names": ("prefix_hooks.core.legacy_names",),
    "prefix_hooks.parameter_versions": ("prefix_hooks.core.parameter_versions",),
    "prefix_hooks.saved_modules": ("prefix_hooks.core.saved_modules",),
    "prefix_hooks.shadows": ("prefix_hooks.core.shadows",),
    "prefix_hooks.transformers_compat": ("prefix_hooks.core.transformers_compat",),
    "prefix_hooks.lora.modules_to_save": ("prefix_hooks.core.modules_to_save",),
    "prefix_hooks.lora.rows": ("prefix_hooks.core.rows",),
    "prefix_hooks.lora.swaps": ("prefix_hooks.core.swaps",),
    "prefix_hooks.lora.switch": ("prefix_hooks.core.switch",),
    "prefix_hooks.attention_interposer": ("prefix_hooks.prefix.interposer",),
    "prefix_hooks.cache_view": ("prefix_hooks.prefix.cache_view",),
    "prefix_hooks.merged_attention": ("prefix_hooks.prefix.merged_attention",),
    "prefix_hooks.prefix_encoder": ("prefix_hooks.prefix.encoder",),
    "prefix_hooks.prefix_views": ("prefix_hooks.prefix.views",),
    "prefix_hooks.splice": ("prefix_hooks.prefix.splice",),
    "prefix_hooks.families.base": ("prefix_hooks.prefix.architecture", "prefix_hooks.core.calls"),
}
"""Old module path -> the modules now holding its names (the first one for a single target)."""


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _warn(message: str) -> None:
    # Attribute the warning to the user's import statement, past this package's frames (warnings.warn
    # itself does not count importlib's frames in stacklevel).
    frame, level = sys._getframe(1), 2  # stacklevel=2 is our caller's frame
    while frame.f_back is not None:
        filename = frame.f_code.co_filename
        if "importlib" not in filename:
            if not os.path.abspath(filename).startswith(_PACKAGE_DIR):
                break
            level += 1
        frame = frame.f_back
    warnings.warn(message, DeprecationWarning, stacklevel=level)


class _MovedModuleLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        targets = MOVED_MODULES[module.__name__]
        _warn(
            f"{module.__name__} moved to {' and '.join(targets)} in prefix_hooks 0.2; the old path goes in "
            f"{REMOVED_IN}. Import from the new module, or from prefix_hooks"
        )
        new = [importlib.import_module(target) for target in targets]
        if len(new) == 1:
            sys.modules[module.__name__] = new[0]  # the import statement returns the module itself
            return
        for source in reversed(new):  # the first target wins a name both define
            module.__dict__.update({key: value for key, value in vars(source).items() if not key.startswith("__")})


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader())


def install() -> None:
    """Answer the old module paths (idempotent)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def moved_attribute(package: str, name: str, source: str) -> Any:
    """A package ``__getattr__``: ``name`` from ``source`` (where the old module's code now lives), with a warning.

    Raises:
        AttributeError: ``name`` is private-dunder, a submodule of ``package``, or not in ``source``.
    """
    package_module = sys.modules[package]
    submodules = {info.name for info in pkgutil.iter_modules(getattr(package_module, "__path__", []))}
    if name.startswith("__") or name in submodules:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name, _MISSING)
    if value is _MISSING:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    _warn(f"{package}.{name} moved to {source}.{name} in prefix_hooks 0.2; the old path goes in {REMOVED_IN}")
    setattr(package_module, name, value)  # one warning per name: `from package import name` reads it twice
    return value


_MISSING = object()
