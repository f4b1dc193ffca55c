"""Old import paths (before the 0.2 layout) still work for one release, each with a DeprecationWarning."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

import prefix_hooks
from prefix_hooks.core.moved import MOVED_MODULES


def _fresh_import(statement: str) -> subprocess.CompletedProcess[str]:
    """Run ``statement`` in a new interpreter with warnings shown once each, so the import really executes."""
    code = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("always", DeprecationWarning)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DeprecationWarning)
            {statement}
        moved = [w for w in caught if issubclass(w.category, DeprecationWarning) and "prefix_hooks 0.2" in str(w.message)]
        print(len(moved))
        for w in moved:
            print(w.filename, "|", w.message)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_old_config_and_prefix_imports_work_with_one_warning_each() -> None:
    result = _fresh_import(
        "from prefix_hooks.config import AdapterConfig, PrefixTuningConfig, TaskType\n"
        "            import prefix_hooks.splice as splice\n"
        "            from prefix_hooks.prefix import attach_prefix, PrefixAttachment\n"
        "            from prefix_hooks.prefix import PrefixForwardState\n"
        "            from prefix_hooks.lora import swaps\n"
        "            import prefix_hooks\n"
        "            assert PrefixTuningConfig is prefix_hooks.PrefixTuningConfig\n"
        "            assert AdapterConfig is prefix_hooks.AdapterConfig and TaskType is prefix_hooks.TaskType\n"
        "            import prefix_hooks.prefix.splice\n"
        "            assert splice is prefix_hooks.prefix.splice\n"
        "            assert swaps is __import__('prefix_hooks.core.swaps', fromlist=['x'])\n"
        "            assert attach_prefix is prefix_hooks.attach_prefix"
    )
    assert result.returncode == 0, result.stderr
    count, *lines = result.stdout.splitlines()
    # config, splice, PrefixForwardState, lora.swaps; attach_prefix/PrefixAttachment live in prefix_hooks.prefix
    assert int(count) == 4, result.stdout
    assert all(line.startswith("<string>") for line in lines), "the warning should point at the user's import line"
    assert any("prefix_hooks.config moved to prefix_hooks.core.config and prefix_hooks.prefix.config" in line for line in lines)


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_every_old_module_path_resolves_to_its_new_home(old: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to"):
        module = importlib.import_module(old)
    targets = [importlib.import_module(name) for name in MOVED_MODULES[old]]
    if len(targets) == 1:
        assert module is targets[0]
    else:
        for target in targets:
            public = [name for name in vars(target) if not name.startswith("_")]
            assert all(hasattr(module, name) for name in public)


def test_a_name_the_old_prefix_module_never_had_is_an_attribute_error() -> None:
    import prefix_hooks.prefix as package

    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        package.not_a_name  # noqa: B018


def test_the_public_api_did_not_shrink() -> None:
    before = {  # prefix_hooks.__all__ at 0.1 (issue 17: the same or larger)
        "AdapterConfig", "ArchitectureAdapter", "Attachment", "CheckpointError", "IA3Attachment", "IA3Config",
        "LoraAttachment", "LoraConfig", "MultiAttachment", "PeftType", "PrefixAttachment", "PrefixEncoder",
        "PrefixTuningConfig", "PromptAttachment", "PromptEmbedding", "PromptEncoder", "PromptEncoderConfig",
        "PromptTuningConfig", "PromptTuningInit", "SaveAdapterCallback", "TaskType", "UnsupportedModelError",
        "active_adapters", "adapter_rows", "attach", "attach_ia3", "attach_lora", "attach_prefix", "attach_prompt",
        "attachments_of", "load_adapter", "register_family", "register_method", "save_adapter",
        "set_active_adapters", "supported",
    }
    assert before <= set(prefix_hooks.__all__)
    assert all(hasattr(prefix_hooks, name) for name in prefix_hooks.__all__)
