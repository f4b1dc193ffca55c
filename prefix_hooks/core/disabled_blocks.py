"""How many ``disabled()`` blocks of one mergeable adapter are open, in every thread and task.

A merged adapter (LoRA, IA3) lives in the base weights, so it cannot be left out of one thread's
forward: merging and ``disabled()`` exclude each other, with an error rather than a wrong output
in another thread. The count changes only when a block opens or closes, never per forward.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


class DisabledBlocks:
    """The open ``disabled()`` blocks of one adapter.

    Args:
        what: the adapter, for messages (e.g. ``"LoRA adapter 'default'"``).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0

    @contextlib.contextmanager
    def open(self, lock: threading.Lock | threading.RLock, merged: Callable[[], bool]) -> Iterator[None]:
        """Count one block while inside (``lock`` guards the count and ``merged()``).

        Raises:
            RuntimeError: the adapter is merged (unmerge() first).
        """
        with lock:
            if merged():
                raise RuntimeError(f"{self.what} is merged into the base weights; unmerge() before disabling it")
            self.count += 1
        try:
            yield
        finally:
            with lock:
                self.count -= 1

    def check_closed(self, enabled: bool, action: str) -> None:
        """Raise if a block is open here (``enabled`` is False) or in another thread or task:
        ``action`` (merging) would apply the adapter there. Call with the count's lock held."""
        if not enabled:
            raise RuntimeError(
                f"{self.what} is disabled here (inside its disabled() block); cannot {action}, which would apply it"
            )
        if self.count:
            raise RuntimeError(
                f"{self.what} is inside disabled() in {self.count} other thread(s) or task(s); cannot {action}, "
                "which would apply it there too: let those blocks end first"
            )
