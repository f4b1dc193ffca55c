"""What every method shares; imports nothing above it (no method, no family, no checkpoint code).

* the lifecycle: :mod:`.attachment` (:class:`Attachment`: attach, detach, ``with``, decorator,
  ``disabled()``), :mod:`.undo` (the undo stack every mutation pushes onto), :mod:`.attached`
  (which handles a model carries), :mod:`.mutations` (freezing, registering the adapter as a
  child), :mod:`.copies` (deepcopy / pickle of an attached model), :mod:`.context_decorator`;
* configs: :mod:`.config` (:class:`AdapterConfig`, :class:`TaskType`, :class:`PeftType`),
  :mod:`.config_fields` (the field checks LoRA and IA3 share);
* several methods at once: :mod:`.compose` (:func:`attach` and the method registry);
* the seams upward: :mod:`.checkpoints` (how the core reaches the checkpoint package),
  :mod:`.merged_weights` (which method merged into a weight), :mod:`.moved` (old import paths);
* transformers: :mod:`.transformers_compat` (every internal name relied on), :mod:`.calls`
  (a root call's arguments by name), :mod:`.shadows` (instance ``forward`` shadows);
* module selection and swaps: :mod:`.targets`, :mod:`.places`, :mod:`.swaps`,
  :mod:`.modules_to_save`, :mod:`.saved_modules`, :mod:`.legacy_names`;
* per-thread state: :mod:`.switch`, :mod:`.rows` (per-row adapters), :mod:`.disabled_blocks`;
* devices and training: :mod:`.devices`, :mod:`.parameter_versions`, :mod:`.compiled`.
"""
