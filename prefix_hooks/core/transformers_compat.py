"""Every transformers-internal name prefix_hooks relies on, found by what it is, not by one spelling.

transformers renames its internals between minor releases (5.24 renamed every
``past_key_values`` argument to ``cache``, and learned-position modules'
``past_key_values_length`` to ``cache_length``; 5.24/5.25 moved GPT-J, CodeGen and Falcon
onto the attention-function registry). The rest of the package asks this module instead
of spelling a keyword, and this module answers by feature detection:

* the cache in a call is found under any spelling transformers has used, or failing that
  as the argument that *is* a :class:`transformers.Cache`;
* the cache of an output is read as the value that is a ``Cache`` (without touching the
  deprecated ``.past_key_values`` shim, which logs);
* a module's own parameter names come from its ``forward`` signature;
* whether an attention module attends through the registry comes from the names its
  ``forward`` code uses.

Nothing here compares version numbers, so a rename we have not seen yet is more likely
to be caught by a type check than to drift silently.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import transformers
from packaging.version import Version
from torch import nn
from transformers.cache_utils import Cache

__all__ = [
    "ALIBI_KEYWORD",
    "CACHE_KEYWORDS",
    "CACHE_LENGTH_KEYWORDS",
    "MASK_KEYWORD",
    "NEWEST_TESTED",
    "OLDEST_TESTED",
    "POSITION_BIAS_KEYWORD",
    "Arguments",
    "UntestedTransformersWarning",
    "alibi_builder",
    "alibi_enabled",
    "attends_through_registry",
    "cache_keyword",
    "cache_length_keyword",
    "cached_length",
    "check_installed_version",
    "find_cache",
    "forward_parameters",
    "is_cache",
    "output_cache",
    "registry_kv_heads",
    "require_known_cache_parameter",
    "unknown_cache_parameters",
]

logger = logging.getLogger("prefix_hooks")

OLDEST_TESTED = "5.18.0"
"""The oldest transformers release the whole test suite passes on (the floor in pyproject.toml)."""

NEWEST_TESTED = "5.25.0"
"""The newest transformers release the whole test suite passes on (pyproject's ceiling is the next minor)."""

CACHE_KEYWORDS: tuple[str, ...] = ("cache", "past_key_values", "layer_past", "cache_params")
"""Names transformers has given the cache argument, newest first: ``cache`` (5.24+) for
models, stacks, layers and attention modules; ``past_key_values`` before; ``layer_past`` in the
attention modules of GPT-J, CodeGen, Falcon and friends before they moved to the registry."""

CACHE_LENGTH_KEYWORDS: tuple[str, ...] = ("cache_length", "past_key_values_length")
"""Names of the "tokens already cached" argument of learned-position tables (OPT, BART, ...)."""


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is newer than the newest release prefix_hooks was tested on."""


class Arguments(Protocol):
    """One call's arguments, addressable by parameter name (``prefix_hooks.families.ForwardCall``)."""

    params: list[str]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def get(self, name: str) -> Any: ...


def is_cache(value: object) -> bool:
    """Whether ``value`` is a transformers cache object (``DynamicCache``, ``StaticCache``, ...)."""
    return isinstance(value, Cache)


def forward_parameters(module_or_function: nn.Module | Callable[..., Any]) -> list[str]:
    """The parameter names of a module's ``forward`` (or of a function), decorators unwrapped."""
    function = module_or_function.forward if isinstance(module_or_function, nn.Module) else module_or_function
    return list(inspect.signature(function).parameters)


def cache_keyword(params: Sequence[str]) -> str | None:
    """The cache parameter among ``params`` (a forward's parameter names), newest spelling first."""
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    return None


def cache_length_keyword(params: Sequence[str]) -> str | None:
    """The cached-length parameter among ``params`` (``cache_length`` or ``past_key_values_length``)."""
    for name in CACHE_LENGTH_KEYWORDS:
        if name in params:
            return name
    return None


_NOT_A_CACHE = frozenset({"use_cache", "cache_position", "cache_positions", "cache_implementation", "cache_config"})


def unknown_cache_parameters(params: Sequence[str]) -> list[str]:
    """Parameters among ``params`` that look like a cache argument under a name we do not know
    (a future rename); empty when the forward takes a known cache keyword or none at all."""
    if cache_keyword(params) is not None:
        return []
    return [
        name for name in params
        if ("cache" in name or name.startswith("past")) and name not in _NOT_A_CACHE
        and name not in CACHE_LENGTH_KEYWORDS
    ]


def require_known_cache_parameter(module: nn.Module) -> None:
    """Raise when ``module.forward`` takes its cache under a name this release does not know.

    Positions, masks and prompts depend on how many tokens the cache already holds; a cache
    we cannot find would make every decode step silently wrong.

    Raises:
        RuntimeError: naming the parameter, the names known, and the installed transformers.
    """
    unknown = unknown_cache_parameters(forward_parameters(module))
    if unknown:
        raise RuntimeError(
            f"{type(module).__name__}.forward takes {', '.join(map(repr, unknown))}, which looks like a cache "
            f"argument under a name prefix_hooks does not know (known: {', '.join(CACHE_KEYWORDS)}); installed transformers "
            f"{transformers.__version__}, newest tested {NEWEST_TESTED}): upgrade prefix_hooks or install a "
            "tested transformers release"
        )


def find_cache(call: Arguments) -> tuple[str | None, Any]:
    """The cache a call carries: ``(keyword it was passed under, cache)``, or ``(None, None)``.

    A caller may use the old keyword on a model that takes the new one (transformers renames
    it inside ``forward``, after our hooks ran), so every known spelling is looked at; a
    ``Cache`` passed under a name we do not know yet is found by its type.

    Raises:
        ValueError: the call passes the cache under two names.
    """
    given = [name for name in CACHE_KEYWORDS if call.kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError(f"the cache is passed twice, as {' and '.join(given)}; pass it once, as {given[0]!r}")
    if given:
        return given[0], call.kwargs[given[0]]
    name = cache_keyword(call.params)
    if name is not None:
        value = call.get(name)
        if value is not None:
            return name, value
    for key, value in call.kwargs.items():
        if is_cache(value):
            return key, value
    for index, value in enumerate(call.args):
        if is_cache(value):
            return (call.params[index] if index < len(call.params) else None), value
    return None, None


def cached_length(cache: object) -> int:
    """Positions already in ``cache`` (0 for ``None`` or an object without ``get_seq_length``)."""
    get_seq_length = getattr(cache, "get_seq_length", None)
    return int(get_seq_length()) if callable(get_seq_length) else 0


def output_cache(output: object) -> Any:
    """The cache a model output carries (``output.cache`` on 5.24+, ``output.past_key_values`` before),
    or ``None``; read as the value that is a ``Cache``, without the deprecated attribute."""
    if not isinstance(output, Mapping):
        return None
    for name in CACHE_KEYWORDS:
        value = dict.get(output, name) if isinstance(output, dict) else None
        if value is not None:
            return value
    for value in output.values():
        if is_cache(value):
            return value
    return None


def attends_through_registry(module: nn.Module) -> bool:
    """Whether ``module``'s forward calls transformers' attention-function registry
    (``ALL_ATTENTION_FUNCTIONS.get_interface`` or an index into it) rather than attending inline."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    names = set(code.co_names) if code is not None else set()
    return "ALL_ATTENTION_FUNCTIONS" in names or "get_interface" in names


# --- probes for the families with attention of their own (falcon, gptj, codegen, gpt_neo, bloom, mpt) ---

MASK_KEYWORD = "attention_mask"
"""The attention module's mask argument (every inline family, every release)."""

ALIBI_KEYWORD = "alibi"
"""BLOOM's alibi argument ``(B * H, 1, S)``; Falcon's ``(B, H, 1, S)`` before 5.25 (which keeps it in the mask only)."""

POSITION_BIAS_KEYWORD = "position_bias"
"""MPT's slot-relative alibi argument ``(H, 1, max_seq_len)``."""


def registry_kv_heads(module: nn.Module, num_heads: int) -> int | None:
    """Key/value heads ``module`` hands the attention function, when it attends through the registry.

    The registry's eager and sdpa functions repeat keys by ``module.num_key_value_groups``, so a
    module that calls them keeps its keys (and its cache) at ``num_heads / num_key_value_groups``
    heads (5.25's Falcon with ``new_decoder_architecture``, where 5.23's broadcast them to every
    query head first). ``None`` for a module that attends inline or has no such attribute.
    """
    groups = getattr(module, "num_key_value_groups", None)
    if not attends_through_registry(module) or not isinstance(groups, int) or groups < 1:
        return None
    return num_heads // groups


def alibi_enabled(module: nn.Module) -> bool:
    """Whether ``module``'s model uses alibi position biases by config (Falcon's ``config.alibi``)."""
    return bool(getattr(getattr(module, "config", None), "alibi", False))


def alibi_builder(module: nn.Module) -> Callable[..., Any] | None:
    """``build_alibi_tensor(mask, num_heads, dtype)`` of the model file that defines ``type(module)``
    (BLOOM's, Falcon's), found through the class rather than an import path; ``None`` if it has none."""
    function = getattr(inspect.getmodule(type(module)), "build_alibi_tensor", None)
    return function if callable(function) else None


def _minor(version: str) -> tuple[int, ...]:
    """``"5.25.0"`` -> ``(5, 25)``; pre-release and local tags are ignored."""
    return Version(version).release[:2]


def check_installed_version(version: str | None = None) -> str | None:
    """Warn (an :class:`UntestedTransformersWarning`, also logged) when the installed transformers
    is outside the tested range ``OLDEST_TESTED`` .. ``NEWEST_TESTED`` (compared by minor release).

    Returns:
        the warning's text, or ``None`` when the version is inside the tested range.
    """
    version = version or transformers.__version__
    release = _minor(version)
    if _minor(OLDEST_TESTED) <= release <= _minor(NEWEST_TESTED):
        return None
    relation = "newer than the newest" if release > _minor(NEWEST_TESTED) else "older than the oldest"
    message = (
        f"transformers {version} is installed, {relation} release prefix_hooks was tested on (tested: "
        f"{OLDEST_TESTED} to {NEWEST_TESTED}); run `python -m prefix_hooks.check` to check every method and "
        "family against it"
    )
    logger.warning(message)
    warnings.warn(message, UntestedTransformersWarning, stacklevel=2)
    return message
