"""Where a selected module sits (``prefix_hooks.core.places``), found again at attach time, and the
checks :mod:`prefix_hooks.core.swaps` makes on top (``parent_for``, ``originals``).

Oracle: hand-built models and the modules they hold.
"""

from __future__ import annotations

import pytest
from torch import nn

from prefix_hooks import LoraConfig, attach_lora
from prefix_hooks.core import swaps
from prefix_hooks.core.modules_to_save import ModulesToSaveWrapper
from prefix_hooks.core.places import Place, parent_now
from prefix_hooks.lora import LoraLayer


class Tiny(nn.Module):
    """``body.0`` and ``body.1`` (Linear 2 -> 2), ``head`` (Linear 2 -> 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        self.head = nn.Linear(2, 1)


def tiny() -> Tiny:
    return Tiny()


def test_a_place_splits_the_name_and_finds_the_parent_again() -> None:
    model = tiny()
    place = Place.of("body.1", model.body[1])
    assert (place.parent_path, place.child_name) == (("body",), "1")
    assert parent_now(model, place) is model.body
    assert parent_now(model, Place.of("head", model.head)) is model


def test_a_path_that_is_gone_or_runs_through_a_replacement_raises() -> None:
    model = tiny()
    place = Place.of("body.1", model.body[1])
    with pytest.raises(RuntimeError, match="lies inside 'body', which another adapter replaced"):
        parent_now(model, place, {id(model.body): "body"})
    del model.body
    with pytest.raises(RuntimeError, match="'body.1': the model has no module 'body' any more"):
        parent_now(model, place)


def test_parent_for_accepts_the_original_or_a_swap_of_the_same_kind() -> None:
    model = tiny()
    place = Place.of("body.0", model.body[0])
    assert swaps.parent_for(model, place, LoraLayer) is model.body
    with attach_lora(model, LoraConfig(r=1, target_modules=["body.0"]), "other"):
        assert isinstance(model.body[0], LoraLayer)
        assert swaps.parent_for(model, place, LoraLayer) is model.body  # shared with the attached adapter
        with pytest.raises(RuntimeError, match=r"'body.0' is a LoRA target of adapters \['other'\]; it cannot also "
                                               "be a module to save here"):
            swaps.parent_for(model, place, ModulesToSaveWrapper)
    model.body[0] = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="'body.0' is no longer the module this adapter was built for"):
        swaps.parent_for(model, place, LoraLayer)


def test_originals_refuses_a_module_holding_a_swap() -> None:
    model = tiny()
    with swaps.lock, attach_lora(model, LoraConfig(r=1, target_modules=["body.0"])):
        view = swaps.clean_view(model)
        found = swaps.originals(model, view, ["body.0", "head"], "a target")
        assert found["head"] is model.head and isinstance(model.body[0], LoraLayer)
        assert found["body.0"] is model.body[0].base_layer
        with pytest.raises(ValueError, match="'body' contains modules that attached LoRA adapters replaced; it cannot "
                                             "be a target while"):
            swaps.originals(model, view, ["body"], "a target")
