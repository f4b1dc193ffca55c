"""Which method's update a module's weight holds now, so that two methods never merge into one weight.

LoRA and (IA)^3 merge by changing a weight in place after keeping a clone of it, and unmerge by
copying their clone back. Were both merged into one weight, the first to unmerge would restore
the weight *it* saw and drop the other's update; so a method merges into a module only while no
other method's update is in its weight. Each mergeable method registers a probe here when it is
imported (a method imports the core, never another method) and calls :func:`check_no_other_merge`
before merging.

Example::

    register_merge_probe("(IA)^3", lambda model, module: "a merged (IA)^3 vector" if ... else None)
    check_no_other_merge(model, {"model.layers.0.mlp.down_proj": down_proj}, "LoRA")  # raises if merged
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

MergeProbe = Callable[[nn.Module, nn.Module], "str | None"]
"""``probe(model, module)``: what of its method ``module``'s weight holds now (``"a merged LoRA
update"``), or None. Called with the merging method's lock held: a probe must not take another lock."""

_probes: dict[str, MergeProbe] = {}


def register_merge_probe(method: str, probe: MergeProbe) -> None:
    """Let ``method`` (``"LoRA"``) answer what it merged into a module (replacing its earlier probe)."""
    _probes[method] = probe


def check_no_other_merge(model: nn.Module, modules: Mapping[str, nn.Module], method: str) -> None:
    """Raise if a method other than ``method`` has merged into one of ``modules`` of ``model``.

    Args:
        modules: qualified name -> module whose weight ``method`` is about to change.

    Raises:
        RuntimeError: naming the module, the update it holds and the adapter to unmerge first.
    """
    for name, module in modules.items():
        for other, probe in _probes.items():
            held = None if other == method else probe(model, module)
            if held is not None:
                raise RuntimeError(
                    f"{name!r} holds {held}; unmerge the {other} adapter before merging {method} into the same "
                    "module (each restores the weight it saw)"
                )
