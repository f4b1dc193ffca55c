"""Prefix tuning (Li & Liang, 2021): trainable keys and values in front of every attention layer.

>>> from prefix_hooks.prefix import attach_prefix, PrefixTuningConfig
>>> with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=20)) as handle:
...     trainer.train()

* :mod:`.config`: :class:`PrefixTuningConfig`; :mod:`.encoder`: :class:`PrefixEncoder`;
* :mod:`.attachment`: :func:`attach_prefix`; :mod:`.state`: the per-forward state;
* :mod:`.architecture`: what a model family must tell the method, and the family registry
  (the adapters themselves live in :mod:`prefix_hooks.families`);
* :mod:`.interposer`, :mod:`.splice`, :mod:`.merged_attention`: the prefix entering attention
  through transformers' attention-function registry; :mod:`.cache_view`: the same for modules
  that attend inline; :mod:`.prefixed_cache`: decode steps that keep the prefix in the cache's
  storage; :mod:`.views`: the per-layer key/value views.

Until 0.2 this package was one module, ``prefix_hooks.prefix``; its other names still resolve
here with a :class:`DeprecationWarning` (see :mod:`prefix_hooks.core.moved`).
"""

from typing import Any

from prefix_hooks.core.compose import register_method
from prefix_hooks.core.moved import moved_attribute
from prefix_hooks.prefix.attachment import PrefixAttachment, attach_prefix
from prefix_hooks.prefix.config import EncoderDecoderLayout, PrefixTuningConfig
from prefix_hooks.prefix.encoder import PrefixEncoder

__all__ = ["EncoderDecoderLayout", "PrefixAttachment", "PrefixEncoder", "PrefixTuningConfig", "attach_prefix"]

register_method(PrefixTuningConfig, attach_prefix)


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, "prefix_hooks.prefix.attachment")
