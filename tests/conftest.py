"""Shared fixtures: seeds, hypothesis profiles, tiny-model factories."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

sys.path.insert(0, str(Path(__file__).parent / "support"))  # the shared tiny-model builders and fixtures

from restoration import make_warm_model  # noqa: F401  (a fixture for every test file)
from tiny_models import build_model

# "ci" (default): bounded and derandomized, so every run checks the same examples.
settings.register_profile(
    "ci",
    max_examples=12,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# "matrix": the version-matrix legs; no shrinking, so a version that breaks many examples
# reports the first failing one at once instead of spending minutes minimising it.
settings.register_profile(
    "matrix",
    parent=settings.get_profile("ci"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tiny models run fastest single-threaded; OpenMP spin-waiting on 2 busy cores costs ~100x.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def make_model() -> Callable[..., torch.nn.Module]:
    """Factory: ``make_model(family, attn_implementation="sdpa", seed=0, **config_overrides)``."""
    return build_model
