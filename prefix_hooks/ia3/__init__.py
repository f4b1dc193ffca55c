"""(IA)^3 (Liu et al., 2022) attached in place: learned vectors rescale target outputs (or feed-forward
inputs) through forward hooks; no module is replaced.
"""

# ruff: noqa: F401  (re-exports)
from prefix_hooks.core.compose import register_method
from prefix_hooks.ia3.attachment import IA3Attachment, attach_ia3
from prefix_hooks.ia3.config import IA3Config
from prefix_hooks.ia3.targets import DEFAULT_FEEDFORWARD_MODULES, DEFAULT_TARGET_MODULES, select_targets

register_method(IA3Config, attach_ia3)
