"""The network: shapes, parameter count, attention maths, precisions, the card's structure."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from model.config import VARIANTS, DenseIsoViTConfig, variant
from model.network import Attention, DenseIsoViT, attention_reference, parameter_count, precision

DEVICE = torch.device(os.environ.get("ISOSR_TEST_DEVICE", "cpu"))
CARD_PARAMS = 23.8e6


def randomised(config: DenseIsoViTConfig, seed: int = 0) -> DenseIsoViT:
    """A model whose residual is not zero (the untrained one is exactly bilinear)."""
    torch.manual_seed(seed)
    model = DenseIsoViT(config)
    torch.nn.init.normal_(model.to_rgb.weight, std=0.02)
    return model.to(DEVICE).eval()


def test_full_variant_has_the_cards_parameter_count():
    model = DenseIsoViT(variant("full"))
    count = parameter_count(model)
    assert abs(count - CARD_PARAMS) / CARD_PARAMS <= 0.01, count
    assert model.config.dense_channels == 1120
    assert model.config.grid_size == 16
    # The card's fp32 size, 90.99 MB, read as MiB.
    assert count * 4 / 2**20 == pytest.approx(90.99, abs=0.05)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_map_a_64_tile_to_256_and_start_as_bilinear(name):
    model = DenseIsoViT(VARIANTS[name]).to(DEVICE).eval()
    lr = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.inference_mode():
        out = model(lr)
    assert out.shape == (2, 3, 256, 256)
    bilinear = F.interpolate(lr, scale_factor=4, mode="bilinear", align_corners=False)
    assert torch.equal(out, bilinear)


def test_token_grid_stays_16x16_through_every_stage():
    model = DenseIsoViT(variant("tiny")).eval()
    shapes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    with torch.inference_mode():
        model(torch.rand(1, 3, 64, 64))
    assert shapes == [(1, 256, d) for d in model.config.embed_dims]


def test_fused_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 6, 256, 32, device=DEVICE) for _ in range(3))
    expected = attention_reference(q, k, v)
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v), expected, atol=1e-5, rtol=1e-5)
    attn = Attention(dim=192, num_heads=6, qkv_bias=True).to(DEVICE)
    x = torch.randn(2, 256, 192, device=DEVICE)
    assert torch.allclose(attn(x, fused=True), attn(x, fused=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_whole_model_fused_and_explicit_attention_agree(name):
    model = randomised(VARIANTS[name])
    lr = torch.rand(2, 3, 64, 64, device=DEVICE)
    with torch.inference_mode():
        fused, explicit = model(lr, fused=True), model(lr, fused=False)
    assert (fused - explicit).abs().max().item() < 1e-4


def test_gdfn_fused_depthwise_conv_is_the_cards_two_paths():
    """The card gives path_1 and path_2 as two depthwise convs; one conv over both halves must agree."""
    model = randomised(variant("tiny"))
    gdfn = model.stages[0].blocks[0].ffn
    hidden = gdfn.out_proj.in_features
    path_1 = torch.nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden).to(DEVICE)
    path_2 = torch.nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden).to(DEVICE)
    with torch.no_grad():
        path_1.weight.copy_(gdfn.paths.weight[:hidden])
        path_1.bias.copy_(gdfn.paths.bias[:hidden])
        path_2.weight.copy_(gdfn.paths.weight[hidden:])
        path_2.bias.copy_(gdfn.paths.bias[hidden:])
    x = torch.randn(2, 256, model.config.embed_dims[0], device=DEVICE)
    g = 16
    h = gdfn.g_proj(x).transpose(1, 2).reshape(2, -1, g, g)
    a, b = h.chunk(2, dim=1)
    card = gdfn.out_proj((path_1(a) * F.gelu(path_2(b))).flatten(2).transpose(1, 2))
    assert torch.allclose(gdfn(x), card, atol=1e-6)


@pytest.mark.parametrize("dtype,tolerance", [("bfloat16", 0.05), ("float16", 0.01)])
def test_runs_under_autocast_close_to_float32(dtype, tolerance):
    model = randomised(variant("tiny"))
    lr = torch.rand(2, 3, 64, 64, device=DEVICE)
    with torch.inference_mode():
        reference = model(lr)
        with precision(DEVICE, dtype):
            low = model(lr)
    assert low.dtype == torch.float32 and low.shape == reference.shape
    assert (low - reference).abs().max().item() < tolerance


def test_rejects_a_tile_of_the_wrong_size():
    model = DenseIsoViT(variant("tiny"))
    with pytest.raises(ValueError, match="64x64 tiles, got 32x48"):
        model(torch.rand(1, 3, 32, 48))


def test_config_is_validated_and_round_trips_through_json():
    config = variant("full")
    assert DenseIsoViTConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="not divisible"):
        DenseIsoViTConfig(embed_dims=(190, 256, 288, 384))
    with pytest.raises(ValueError, match="one entry per stage"):
        DenseIsoViTConfig(depths=(3, 3, 3))
    with pytest.raises(ValueError, match="unknown fields.*'heads'"):
        DenseIsoViTConfig.from_json('{"heads": [1, 2]}')
    with pytest.raises(TypeError):
        DenseIsoViTConfig(192)  # keyword-only: a positional value is a mistake
    with pytest.raises(ValueError, match="unknown model variant 'huge'"):
        variant("huge")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu_float32():
    model = randomised(variant("tiny")).cpu()
    lr = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        reference = model(lr)
        gpu = model.cuda()
        with precision(torch.device("cuda"), "bfloat16"):
            out = gpu(lr.cuda()).cpu()
    assert (out - reference).abs().max().item() < 0.05
