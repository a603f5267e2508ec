"""Exports that other projects load: adapters in peft's layout (PeftModel.from_pretrained, no warning), one
LoRA file for diffusers' Wan loader (`merge --format diffusers-lora`), merged weights as a diffusers
WanTransformer3DModel folder and as a Self-Forcing .pt. Outputs are compared on one chunk with no cache
(plain bidirectional attention, where diffusers' transformer and ours compute the same function)."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from arcopo_fast import adapters  # noqa: E402
from arcopo_fast.merge import main as merge_main  # noqa: E402
from arcopo_fast.model.checkpoint import load_model  # noqa: E402

SEMI_TARGETS = r".*\.(self_attn\.(q|o)|ffn\.2)$"
ON_TARGETS = r".*\.(self_attn\.(q|k|v|o)|cross_attn\.(q|o)|ffn\.(0|2))$"


def _adapter(base_dir, name, rank, alpha, targets, out, seed):
    m = load_model(base_dir)
    adapters.add_lora(m, name, rank=rank, alpha=alpha, target_modules=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return adapters.save_adapter(m, name, out)


@pytest.fixture(scope="module")
def files(wan_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    wan_pipe.transformer.save_pretrained(root / "base")  # a diffusers folder: any loader here reads it
    return dict(
        root=root, base=root / "base",
        semi=_adapter(root / "base", "semi", 2, 4, SEMI_TARGETS, root / "semi", 1),
        on=_adapter(root / "base", "on", 4, 8, ON_TARGETS, root / "on", 2),
    )


def _inputs(cfg):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 3, 4, 6, generator=g), torch.tensor([937.5]), torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)


def ours(model, x, t, ctx):
    with torch.no_grad():
        return model(x.transpose(1, 2), t, model.encode_text(ctx)).transpose(1, 2)


def ours_with(files, scales: dict[str, float]):
    model = load_model(files["base"])
    for name in scales:
        adapters.load_adapter(model, name, files[name])
    adapters.activate(model, scales)
    return model


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_peft_loads_our_adapter_without_warnings(files):
    model = load_model(files["base"])
    x, t, ctx = _inputs(model.cfg)
    base_out = ours(model, x, t, ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model = peft.PeftModel.from_pretrained(model, files["on"])
    got = ours(peft_model, x, t, ctx)
    want = ours(ours_with(files, {"on": 1.0}), x, t, ctx)
    assert (want - base_out).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    cfg = json.loads((files["on"] / adapters.ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and "peft_version" in cfg


def test_adapters_written_before_still_load(files, tmp_path):
    """The layout this package wrote before (unprefixed keys, a hand-written config) loads as before."""
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    old.mkdir()
    state = load_file(str(files["on"] / adapters.ADAPTER_FILE))
    save_file({k.removeprefix(adapters.PEFT_PREFIX): v for k, v in state.items()}, str(old / adapters.ADAPTER_FILE))
    (old / adapters.ADAPTER_CONFIG).write_text(json.dumps(
        {"r": 4, "lora_alpha": 8, "target_modules": ON_TARGETS, "peft_type": "LORA", "adapter_name": "on",
         "lora_dropout": 0.0, "bias": "none"}))
    x, t, ctx = _inputs(load_model(files["base"]).cfg)
    model = load_model(files["base"])
    adapters.load_adapter(model, "on", old)
    torch.testing.assert_close(ours(model, x, t, ctx), ours(ours_with(files, {"on": 1.0}), x, t, ctx), rtol=0, atol=0)


def _diffusers_pipe_with_lora(wan_pipe, path):
    from diffusers import WanPipeline
    from pipeline_helpers import tiny_transformer

    pipe = WanPipeline(tokenizer=wan_pipe.tokenizer, text_encoder=wan_pipe.text_encoder, transformer=tiny_transformer(0),
                       vae=wan_pipe.vae, scheduler=wan_pipe.scheduler)  # a fresh transformer: the fixture stays clean
    pipe.load_lora_weights(path)
    return pipe


@pytest.mark.parametrize("args,scales", [
    (["--on", "on", "--scale", "0.5"], {"on": 0.5}),                      # one adapter: alpha carries the scale
    (["--semi", "semi", "--on", "on", "--scale", "0.8"], {"semi": 1.0, "on": 0.8}),  # stacked along the rank
])
def test_diffusers_lora_loads_in_diffusers_wan_pipeline(wan_pipe, files, tmp_path, args, scales):
    out = tmp_path / "lora"
    argv = [str(files[a]) if a in ("on", "semi") else a for a in args]
    assert merge_main([*argv, "--format", "diffusers-lora", "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("transformer.blocks.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    config = json.loads(meta["lora_adapter_metadata"])
    alpha = next(v for k, v in config.items() if k.endswith("lora_alpha"))
    assert alpha == (0.5 * 8 if len(scales) == 1 else 6)  # one adapter: s * alpha; stacked: alpha = rank 2 + 4
    pipe = _diffusers_pipe_with_lora(wan_pipe, out)
    x, t, ctx = _inputs(load_model(files["base"]).cfg)
    with torch.no_grad():
        got = pipe.transformer(x, t, ctx).sample
        base_out = wan_pipe.transformer(x, t, ctx).sample
    want = ours(ours_with(files, scales), x, t, ctx)
    assert (want - base_out).abs().max() > 1e-3
    close(got, want)


def test_merged_weights_as_diffusers_folder_and_self_forcing_pt(files, tmp_path):
    from diffusers import WanTransformer3DModel

    merged = ["--base", str(files["base"]), "--semi", str(files["semi"]), "--on", str(files["on"]), "--scale", "0.8"]
    x, t, ctx = _inputs(load_model(files["base"]).cfg)
    want = ours(ours_with(files, {"semi": 1.0, "on": 0.8}), x, t, ctx)

    assert merge_main([*merged, "--format", "diffusers", "--out", str(tmp_path / "dif")]) == 0
    dif = WanTransformer3DModel.from_pretrained(tmp_path / "dif").eval()
    with torch.no_grad():
        close(dif(x, t, ctx).sample, want)
    close(ours(load_model(tmp_path / "dif"), x, t, ctx), want)

    assert merge_main([*merged, "--format", "self-forcing", "--out", str(tmp_path / "merged.pt")]) == 0
    ckpt = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert set(ckpt) == {"generator", "generator_ema"}
    sd = ckpt["generator_ema"]
    assert all(k.startswith("model.") for k in sd)
    # the Self-Forcing key layout of docs/model.md ("Original Wan2.1 names"), every entry present, nothing else
    layout = [r"patch_embedding", r"text_embedding\.[02]", r"time_embedding\.[02]", r"time_projection\.1",
              r"blocks\.\d+\.self_attn\.(q|k|v|o|norm_q|norm_k)", r"blocks\.\d+\.norm3", r"blocks\.\d+\.cross_attn\.\w+",
              r"blocks\.\d+\.ffn\.[02]", r"blocks\.\d+\.modulation", r"head\.head", r"head\.modulation"]
    names = [k.removeprefix("model.") for k in sd]
    for pattern in layout:
        assert any(re.fullmatch(pattern + r"(\.weight|\.bias)?", n) for n in names), pattern
    assert all(any(re.fullmatch(p + r"(\.weight|\.bias)?", n) for p in layout) for n in names)
    close(ours(load_model(tmp_path / "merged.pt"), x, t, ctx), want)


@pytest.mark.parametrize("scale", ["nan", "inf"])
def test_merge_refuses_a_scale_that_is_not_finite(files, tmp_path, capsys, scale):
    # W0 + s * dW with s = nan / inf would be written as a checkpoint that every loader then refuses
    argv = ["--base", str(files["base"]), "--on", str(files["on"]), "--scale", scale, "--out", str(tmp_path / "m.safetensors")]
    assert merge_main(argv) == 2
    assert "--scale" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()


def test_an_adapter_of_another_base_model_is_refused_by_name(tmp_path):
    """The tiny model's adapter loaded into the toy model (what `merge --base <toy> --on runs/tiny` did): a
    ValueError naming the adapter, the layer and both widths, before anything is injected (it was a
    RuntimeError listing every mismatching tensor, out of peft's load)."""
    from arcopo_fast.model.config import get_preset
    from arcopo_fast.model.wan import CausalWanModel

    small = CausalWanModel(get_preset("tiny"))
    adapters.add_lora(small, "on", rank=4, alpha=8.0, target_modules=ON_TARGETS)
    src = adapters.save_adapter(small, "on", tmp_path / "adapter")
    other = CausalWanModel(get_preset("toy"))
    with pytest.raises(ValueError, match=r"does not fit this model: .* for a layer of 64 inputs, the model's .* has 96"):
        adapters.load_adapter(other, "on", src)
    assert adapters.lora_layers(other) == []
