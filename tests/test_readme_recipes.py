"""The README's "Use it from your project" recipes, executed as written on tiny models: the diffusers and
Self-Forcing recipes in a folder holding tiny stand-ins of the files they name (only the 480 x 832 x 81 size
is shrunk), and the flash-attn swap against the reference of tests/test_flash_compat.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

README = Path(__file__).resolve().parents[1] / "README.md"
FULL_SIZE = "height=480, width=832, num_frames=81"
SMALL_SIZE = "height=32, width=32, num_frames=21"


def recipes() -> list[str]:
    text = README.read_text()
    section = text[text.index("### Use it from your project"):]
    section = section[: section.index("\n### ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_the_three_recipes():
    blocks = recipes()
    assert len(blocks) == 3
    assert "from_diffusers(wan_pipe" in blocks[0] and "from_self_forcing(" in blocks[1]
    assert "from arcopo_fast import flash_attn_with_kvcache" in blocks[2]


@pytest.fixture
def project(tmp_path, monkeypatch, wan_pipe):
    """A working folder with checkpoints/self_forcing_dmd.pt, wan_models/Wan2.1-T2V-1.3B/ and tuned_adapter/."""
    from model_helpers import make_tiny_model
    from pipeline_helpers import write_self_forcing_layout

    from arcopo_fast import adapters

    write_self_forcing_layout(tmp_path, wan_pipe)
    donor = make_tiny_model()
    adapters.add_lora(donor, "on", rank=2, alpha=2, target_modules=r".*\.self_attn\.q$")
    adapters.save_adapter(donor, "on", tmp_path / "tuned_adapter")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(block: str, namespace: dict) -> dict:
    assert FULL_SIZE in block or "flash_attn" in block
    exec(compile(block.replace(FULL_SIZE, SMALL_SIZE), str(README), "exec"), namespace)  # noqa: S102
    return namespace


def test_diffusers_recipe(project, wan_pipe):
    ns = _run(recipes()[0], {"wan_pipe": wan_pipe})
    assert ns["frames"].shape == (1, 21, 3, 32, 32)
    assert ns["pipe"].text_encoder._model is wan_pipe.text_encoder


def test_self_forcing_recipe(project, capsys):
    ns = _run(recipes()[1], {})
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["torch.Size([1, 9, 3, 32, 32])", "torch.Size([1, 12, 3, 32, 32])"]
    assert "lora0" in ns["pipe"]._lora_scales


def test_flash_attn_swap_recipe():
    from test_flash_compat import _inputs, flash_ref

    q, k_cache, v_cache, k, v = _inputs()
    lens = torch.tensor([0, 5, 9], dtype=torch.int32)
    want, _, want_k, _ = flash_ref(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True)
    ns = _run(recipes()[2], dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=lens))
    torch.testing.assert_close(ns["out"].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache.double(), want_k, rtol=0, atol=0)
