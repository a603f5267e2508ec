"""Checkpoint formats round-trip into CausalWanModel; bad checkpoints fail with errors that name the problem."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from model_helpers import make_tiny_model
from safetensors.torch import save_file

from arcopo_fast.model.checkpoint import (
    CheckpointError,
    config_from_state_dict,
    detect_format,
    load_into,
    load_model,
    load_state_dict,
    model_state_dict,
    save_model,
)
from arcopo_fast.model.config import get_preset
from arcopo_fast.model.wan import CausalWanModel


def _sd(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(model, sd):
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def _assert_same_outputs(a, b):
    torch.manual_seed(5)
    x = torch.randn(2, 3, 16, 4, 6)
    ctx = torch.randn(2, 5, a.cfg.text_dim)
    t = torch.rand(2, 3) * 1000
    with torch.no_grad():
        torch.testing.assert_close(b(x, t, b.encode_text(ctx)), a(x, t, a.encode_text(ctx)), rtol=0, atol=0)


# -- formats -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [None, True, False])
def test_self_forcing_pt(tmp_path, ema):
    gen, gen_ema = make_tiny_model(0), make_tiny_model(1)
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save(
        {
            "generator": {f"model.{k}": v for k, v in gen.state_dict().items()},
            "generator_ema": {f"model._fsdp_wrapped_module.{k}": v for k, v in gen_ema.state_dict().items()},
        },
        path,
    )
    assert detect_format(path) == "self_forcing"
    model = load_model(path, ema=ema)
    want = gen if ema is False else gen_ema  # default: generator_ema when present
    assert model.cfg == get_preset("tiny")  # inferred from the shapes (matches the tiny preset)
    _assert_same_weights(model, _sd(want))
    _assert_same_outputs(want, model)


def test_self_forcing_pt_without_ema(tmp_path):
    gen = make_tiny_model(0)
    path = tmp_path / "gen_only.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in gen.state_dict().items()}}, path)
    _assert_same_weights(load_model(path), _sd(gen))
    with pytest.raises(CheckpointError, match="generator_ema"):
        load_model(path, ema=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_original_names_plain_state_dict(tmp_path, suffix):
    ref = make_tiny_model(2)
    path = tmp_path / f"wan{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        torch.save(ref.state_dict(), path)
    assert detect_format(path) == "wan"
    model = load_model(path, "tiny")
    _assert_same_weights(model, _sd(ref))
    _assert_same_outputs(ref, model)
    assert load_model(path).cfg == get_preset("tiny")


def test_save_model_round_trip_keeps_config(tmp_path):
    ref = make_tiny_model(3, text_len=9, chunk_frames=2)
    path = save_model(ref, tmp_path / "out" / "model.safetensors")
    side = json.loads((tmp_path / "out" / "model.json").read_text())
    assert side["config"]["text_len"] == 9
    model = load_model(path)
    assert model.cfg == ref.cfg
    _assert_same_weights(model, _sd(ref))
    _assert_same_outputs(ref, model)
    # The config is also in the safetensors metadata: the file alone is enough.
    (tmp_path / "out" / "model.json").unlink()
    assert load_model(path).cfg == ref.cfg
    # bf16 storage, loaded back in bf16 and float32.
    path16 = save_model(ref, tmp_path / "m16.safetensors", dtype=torch.bfloat16)
    assert load_model(path16, dtype=None).dtype == torch.bfloat16
    assert load_model(path16).dtype == torch.float32


def _tiny_diffusers(seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
    )


@pytest.mark.parametrize("sharded", [False, True])
def test_diffusers_folder(tmp_path, sharded):
    pytest.importorskip("diffusers")
    dm = _tiny_diffusers()
    dm.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "10GB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists() == sharded
    assert detect_format(tmp_path) == "diffusers"
    model = load_model(tmp_path)
    assert model.cfg == get_preset("tiny").replace(init_std_head=model.cfg.init_std_head)
    sd = model.state_dict()
    # Spot-check the name mapping, including the norm2 (diffusers) -> norm3 (Wan) swap.
    pairs = {
        "blocks.1.norm3.weight": dm.blocks[1].norm2.weight,
        "blocks.0.modulation": dm.blocks[0].scale_shift_table,
        "head.modulation": dm.scale_shift_table,
        "head.head.weight": dm.proj_out.weight,
        "time_projection.1.weight": dm.condition_embedder.time_proj.weight,
        "text_embedding.2.bias": dm.condition_embedder.text_embedder.linear_2.bias,
        "blocks.1.cross_attn.o.weight": dm.blocks[1].attn2.to_out[0].weight,
        "blocks.0.self_attn.norm_k.weight": dm.blocks[0].attn1.norm_k.weight,
        "blocks.0.ffn.0.weight": dm.blocks[0].ffn.net[0].proj.weight,
    }
    for k, v in pairs.items():
        assert torch.equal(sd[k], v), k
    # A pipeline folder (model_index.json + transformer/) resolves to its transformer.
    pipe = tmp_path / "pipe"
    dm.save_pretrained(pipe / "transformer")
    (pipe / "model_index.json").write_text("{}")
    _assert_same_weights(load_model(pipe), {k: v.clone() for k, v in sd.items()})


def test_wan_folder_with_wan_config(tmp_path):
    ref = make_tiny_model(4)
    cfg = ref.cfg
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()},
        str(tmp_path / "diffusion_pytorch_model.safetensors"),
    )
    conf = dict(
        _class_name="WanModel",
        model_type="t2v",
        dim=cfg.dim,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim,
        in_dim=16,
        out_dim=16,
        eps=1e-6,
        text_len=cfg.text_len,
    )
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert detect_format(tmp_path) == "wan"
    model = load_model(tmp_path)
    assert model.cfg.num_heads == cfg.num_heads and model.cfg.text_len == cfg.text_len
    _assert_same_outputs(ref, model)


def test_config_inference_without_preset(tmp_path):
    ref = CausalWanModel(get_preset("tiny").replace(dim=256, num_heads=2, ffn_dim=96))
    cfg = config_from_state_dict(ref.state_dict())
    assert (cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.num_layers) == (256, 2, 96, 2)  # head_dim 128 as in Wan
    odd = CausalWanModel(get_preset("tiny").replace(ffn_dim=96))
    path = tmp_path / "odd.pth"
    torch.save(odd.state_dict(), path)
    with pytest.raises(CheckpointError, match="num_heads"):
        load_model(path)
    assert load_model(path, get_preset("tiny").replace(ffn_dim=96)).cfg.ffn_dim == 96
    assert load_model(path, num_heads=4).cfg.num_heads == 4


def test_load_into_and_peft_merge(tmp_path):
    peft = pytest.importorskip("peft")
    ref = make_tiny_model(5)
    lora = make_tiny_model(6)
    load_into(lora, ref.state_dict())
    _assert_same_outputs(ref, lora)
    lora = peft.inject_adapter_in_model(
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k", "v", "o"]), lora
    )
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    path = save_model(lora, tmp_path / "merged.safetensors")
    merged = load_model(path)
    torch.manual_seed(0)
    x, ctx, t = torch.randn(1, 3, 16, 4, 4), torch.randn(1, 5, 32), torch.tensor([700.0])
    with torch.no_grad():
        want = lora(x, t, lora.encode_text(ctx))
        got = merged(x, t, merged.encode_text(ctx))
        base = ref(x, t, ref.encode_text(ctx))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - base).abs().max() > 1e-3  # the adapter did change the model
    # Base weights of a peft model load in place; adapters stay.
    load_into(lora, make_tiny_model(7).state_dict())
    assert set(model_state_dict(lora, merge_lora=False)) == set(ref.state_dict())


# -- errors ------------------------------------------------------------------------------------------------


def _write(tmp_path, sd, name="bad.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = _sd(make_tiny_model())
    del sd["blocks.1.self_attn.norm_q.weight"], sd["head.head.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        load_model(_write(tmp_path, sd), "tiny")
    msg = str(e.value)
    for k in (
        "blocks.1.self_attn.norm_q.weight",
        "head.head.bias",
        "blocks.0.extra.weight",
        "missing",
        "unexpected",
    ):
        assert k in msg, msg


def test_wrong_shape_names_key_and_shapes(tmp_path):
    sd = _sd(make_tiny_model())
    sd["blocks.0.ffn.2.bias"] = torch.zeros(65)
    with pytest.raises(
        CheckpointError, match=r"blocks\.0\.ffn\.2\.bias: checkpoint \(65,\) vs model \(64,\)"
    ):
        load_model(_write(tmp_path, sd), "tiny")


def test_config_mismatch_names_field(tmp_path):
    path = _write(tmp_path, _sd(make_tiny_model()))
    with pytest.raises(CheckpointError, match=r"ffn_dim: checkpoint 128 vs config 256"):
        load_model(path, get_preset("tiny").replace(ffn_dim=256))
    with pytest.raises(CheckpointError, match=r"dim: checkpoint 64 vs config 1536"):
        load_model(path, "wan-1.3b")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_dict(tmp_path / "nope.safetensors")
    pytest.importorskip("diffusers")
    _tiny_diffusers().save_pretrained(tmp_path / "d", max_shard_size="100KB")
    shard = sorted((tmp_path / "d").glob("diffusion_pytorch_model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        load_model(tmp_path / "empty")


def test_damaged_safetensors_files_are_named(tmp_path):
    """A truncated download or a file that is not safetensors at all: a CheckpointError naming it (the CLIs
    print it as an error), not safetensors' own exception out of the loader."""
    good = tmp_path / "good.safetensors"
    save_model(make_tiny_model(), good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:1000])
    (tmp_path / "text.safetensors").write_text("not weights\n")
    for name in ("cut.safetensors", "text.safetensors"):
        with pytest.raises(CheckpointError, match=rf"{name} is not a readable \.safetensors file"):
            load_model(tmp_path / name)


def test_pickled_objects_are_refused_by_default(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save(
        {"generator": _sd(make_tiny_model()), "args": argparse.Namespace(lr=1e-5)}, path
    )  # not weights_only-safe
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_model(path)
    assert load_model(path, allow_pickle=True).cfg == get_preset("tiny")


def test_wan_13b_preset_on_meta():
    with torch.device("meta"):
        model = CausalWanModel(get_preset("wan-1.3b"))
    # Wan2.1-T2V-1.3B: 1,418,996,800 parameters (computed from the architecture; "1.3B" in the name).
    assert sum(p.numel() for p in model.parameters()) == 1_418_996_800
    assert model.cfg.head_dim == 128 and model.cfg.rope_split == (22, 21, 21)
