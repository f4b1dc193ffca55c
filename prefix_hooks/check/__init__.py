"""``python -m prefix_hooks.check``: check every method on every family against the installed transformers.

Each method (prefix tuning, LoRA, prompt tuning, P-tuning, IA3) is attached to a tiny, seeded
model of each supported family (:mod:`.tiny_models`; built from configs, nothing is downloaded),
with adapter weights that are clearly not a no-op (:mod:`.adapters`), and the promises are checked
(:mod:`.invariants`):

* ``changes``: the adapter changes the output (by more than :data:`MIN_EFFECT`);
* ``cache``: incremental decoding through ``forward`` equals one full forward (families that
  decode with a cache);
* ``generate``: greedy ``generate()`` with the cache equals it without;
* ``detach``: after detach the outputs and every ``state_dict`` tensor are bit-exactly what
  they were before attaching.

Cells a method refuses by design (:data:`REFUSED`: prompt methods on models without token
inputs, and llava) must raise before touching the model. Errors are absolute, float32, and
must stay within ``--tolerance`` (``detach`` must be exact). The command (:mod:`.cli`) prints a
family x method table (:mod:`.report`) with the worst error per cell and exits non-zero on any
failure or unexpected exception; :func:`run_check` runs the same check in-process (:mod:`.run`),
one cell (:mod:`.cells`) at a time.

Example::

    python -m prefix_hooks.check                                  # everything: ~6 s, plus ~7 s of imports
    python -m prefix_hooks.check --families llama,t5 --methods prefix,lora
"""

from prefix_hooks.check.adapters import METHODS, REFUSED
from prefix_hooks.check.cli import main
from prefix_hooks.check.invariants import INVARIANTS, MIN_EFFECT, TOLERANCE
from prefix_hooks.check.report import CellResult, CheckReport
from prefix_hooks.check.run import run_check

__all__ = [
    "INVARIANTS",
    "METHODS",
    "MIN_EFFECT",
    "REFUSED",
    "TOLERANCE",
    "CellResult",
    "CheckReport",
    "main",
    "run_check",
]
