"""What every adapter config shares: the :class:`AdapterConfig` base, :class:`TaskType` and
:class:`PeftType` (PEFT's strings), and the field checks the method configs use.

A config says what the user wants; each method's config subclasses :class:`AdapterConfig`
(``prefix_hooks.prefix.config``, ``prefix_hooks.lora.config``, ...). Reading and writing
``adapter_config.json`` is served by the checkpoint package through
:mod:`prefix_hooks.core.checkpoints`.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import os
from dataclasses import dataclass
from typing import Any, TypeVar

from prefix_hooks.core.checkpoints import checkpoint_format

C = TypeVar("C", bound="AdapterConfig")


class TaskType(str, enum.Enum):
    """The task a model head solves; the values are PEFT's strings."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """Adapter method names, as PEFT spells them in ``adapter_config.json``."""

    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    IA3 = "IA3"
    ADALORA = "ADALORA"


def check_positive_int(name: str, value: object, *, allow_none: bool = True) -> None:
    """Raise ``ValueError`` naming ``value`` unless it is a positive int (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        accepted = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name}={value!r} is not accepted; expected {accepted}")


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields and file methods shared by every adapter config (PEFT's ``PeftConfig``).

    The fields are keyword-only, so the positional order of each method's own fields is
    unchanged. A method's class narrows ``peft_type`` to its own value.

    Args:
        peft_type: the method, as PEFT spells it in ``adapter_config.json`` (:class:`PeftType`).
        task_type: the model's task (:class:`TaskType`), informational as in PEFT.
        base_model_name_or_path: the base model's hub id or folder, informational as in PEFT.
        revision: the base model's revision, informational as in PEFT.
        inference_mode: build the adapter frozen (and, for prompt learning, folded).

    Files: :meth:`save_pretrained` writes ``adapter_config.json`` in PEFT's form (PEFT's keys at
    the top level; our own fields, which PEFT has no place for, under the ``"prefix_hooks"``
    key, which PEFT drops with a warning); :meth:`from_pretrained` reads PEFT's files and ours.
    """

    peft_type: PeftType | str
    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def _check_common_fields(self) -> None:
        """Validate the fields every method shares; each method's ``__post_init__`` calls this.

        Raises:
            ValueError: naming the field, its value and what is accepted.
        """
        for name in ("base_model_name_or_path", "revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}={value!r} is not accepted; expected a string or None")
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"inference_mode={self.inference_mode!r} is not accepted; expected a bool (True or False)")

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict of every field, our names (enums as strings, sets as sorted lists,
        tuples as lists); lists and dicts are copies, so changing the result leaves the config alone."""
        out: dict[str, Any] = {}
        for config_field in dataclasses.fields(self):
            value = getattr(self, config_field.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, frozenset)):
                value = sorted(value)
            elif isinstance(value, (tuple, list, dict)):
                value = copy.deepcopy(list(value) if isinstance(value, tuple) else value)
            out[config_field.name] = value
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content: PEFT's keys, our other fields under ``"prefix_hooks"``."""
        return checkpoint_format().config_to_json(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config from :meth:`to_dict` or :meth:`to_json_dict` output, or PEFT's config dict.

        Unknown keys are dropped with a warning naming them; PEFT keys this package does not
        implement load silently at PEFT's default and raise otherwise.

        Raises:
            ValueError: a wrong type or value (naming the key), or a ``peft_type`` of another class.
        """
        return _expect_class(cls, checkpoint_format().config_from_dict(data))

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``adapter_config.json`` (atomically) into ``save_directory``, creating it if needed."""
        checkpoint_format().write_config(save_directory, self.to_json_dict())

    @classmethod
    def from_pretrained(
        cls: type[C], name_or_path: str | os.PathLike[str], *, subfolder: str | None = None, revision: str | None = None
    ) -> C:
        """Read ``adapter_config.json`` from a local folder or a hub repository (see :func:`from_dict`).

        Raises:
            FileNotFoundError: no ``adapter_config.json`` there.
            ValueError: the file is invalid, or holds a config of another method than ``cls``.
        """
        checkpoints = checkpoint_format()
        data = checkpoints.read_config(name_or_path, subfolder=subfolder, revision=revision)
        return _expect_class(cls, checkpoints.config_from_dict(data))


def _expect_class(cls: type[C], config: AdapterConfig) -> C:
    if not isinstance(config, cls):
        raise ValueError(
            f"the config is a {type(config).__name__} (peft_type={PeftType(config.peft_type).value!r}), "
            f"not a {cls.__name__}; load it with AdapterConfig.from_pretrained / from_dict to accept any method"
        )
    return config
