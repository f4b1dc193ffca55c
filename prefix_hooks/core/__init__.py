"""What every method shares; imports nothing above it (no method, no checkpoint package).

* :mod:`.attachment`: the attach/detach lifecycle (:class:`Attachment`) and its undo stack;
* :mod:`.config`: :class:`AdapterConfig`, :class:`TaskType`, :class:`PeftType`;
* :mod:`.compose`: several methods in one block (:func:`attach`) and the method registry;
* :mod:`.checkpoints`: the seam through which the checkpoint package serves folders;
* :mod:`.transformers_compat`: every transformers-internal name the package relies on;
* :mod:`.calls`, :mod:`.shadows`: a root call's arguments by name, instance ``forward`` shadows;
* :mod:`.swaps`, :mod:`.modules_to_save`, :mod:`.saved_modules`, :mod:`.switch`, :mod:`.rows`,
  :mod:`.disabled_blocks`: module swaps, trainable copies, per-thread switches and per-row adapters;
* :mod:`.devices`, :mod:`.parameter_versions`, :mod:`.compiled`, :mod:`.legacy_names`.
"""
