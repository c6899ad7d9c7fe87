"""The Input Adaptformer's tokenizers: conv stem (default) and linear patches, 2D and 3D, and honest masking."""

import json

import pytest
import torch

from medformer_hf import MedformerConfig, MedformerForMultiTask, MedformerModel
from medformer_hf.modeling_medformer import MedformerConvBlock, MedformerConvStem, pixel_mask

from .conftest import make_tiny_config

KINDS = [(2, 1, 28, 28), (2, 3, 28, 28), (2, 1, 28, 28, 28), (1, 1, 12, 36, 20), (1, 3, 8, 44)]


@pytest.mark.parametrize("tokenizer", ["conv", "linear", "conv_with_blocks"])
@pytest.mark.parametrize("shape", KINDS)
def test_both_tokenizers_give_one_token_per_patch(tokenizer, shape):
    blocks = {"conv_stem_blocks": 2} if tokenizer == "conv_with_blocks" else {}
    config = make_tiny_config(tokenizer=tokenizer.removesuffix("_with_blocks"), **blocks)
    embeddings = MedformerModel(config).input_adaptformer.patch_embeddings
    tokens = embeddings(torch.randn(shape))
    assert tokens.shape == (shape[0], torch.Size(shape[2:]).numel() // 4 ** (len(shape) - 2), config.hidden_size)
    assert torch.isfinite(tokens).all()


def test_conv_is_the_default_and_a_stem():
    embeddings = MedformerModel(make_tiny_config()).input_adaptformer.patch_embeddings
    assert all(isinstance(module, MedformerConvStem) for module in embeddings.projections.values())
    assert set(embeddings.projections) == {"2d_1ch", "2d_3ch", "3d_1ch"}


def test_stem_depth_must_match_the_patch_size():
    with pytest.raises(ValueError, match="patch_size_2d=8"):
        make_tiny_config(conv_stem_channels=[16, 32])
    config = make_tiny_config(conv_stem_channels=[16, 32], patch_size_2d=8, patch_size_3d=8)
    assert MedformerModel(config)(torch.randn(1, 1, 32, 32)).last_hidden_state.shape[1] == config.num_latents
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        make_tiny_config(tokenizer="vq")
    with pytest.raises(ValueError, match="conv_stem_blocks"):
        make_tiny_config(conv_stem_blocks=-1)
    with pytest.raises(ValueError, match="use tokenizer=.conv. with at least one conv_stem_channels"):
        make_tiny_config(conv_stem_blocks=1, tokenizer="linear")


def test_stem_blocks_add_residual_depth_at_the_intermediate_resolution():
    stem = MedformerModel(make_tiny_config(conv_stem_blocks=2)).input_adaptformer.patch_embeddings.projections["3d_1ch"]
    blocks = [module for module in stem if isinstance(module, MedformerConvBlock)]
    assert len(blocks) == 2 and blocks[0].conv.stride == (1, 1, 1)
    hidden = torch.randn(1, stem[0].out_channels, 6, 6, 6)
    torch.nn.init.zeros_(blocks[0].conv.weight), torch.nn.init.zeros_(blocks[0].conv.bias)
    torch.testing.assert_close(blocks[0](hidden), hidden)  # a zero branch is the identity: a residual block


def test_a_folder_saved_before_the_option_loads_as_linear(tmp_path):
    model = MedformerForMultiTask(make_tiny_config(tokenizer="linear")).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["tokenizer"], saved["conv_stem_channels"]  # as written before the conv stem existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = MedformerForMultiTask.from_pretrained(tmp_path).eval()
    assert loaded.config.tokenizer == "linear"
    pixels = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(pixels, task="organ").logits, model(pixels, task="organ").logits)
    assert MedformerConfig().tokenizer == "conv"


@pytest.mark.parametrize("tokenizer", ["conv", "linear", "conv_with_blocks"])
@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 1, 16, 16, 16)])
def test_masked_pixels_never_reach_the_encoder(tokenizer, shape):
    """Changing only masked pixels leaves the latents unchanged (a conv stem over the unmasked image fails this)."""
    torch.manual_seed(0)
    blocks = {"conv_stem_blocks": 1} if tokenizer == "conv_with_blocks" else {}
    model = MedformerModel(make_tiny_config(tokenizer=tokenizer.removesuffix("_with_blocks"), **blocks)).eval()
    pixels = torch.randn(shape)
    num_patches = torch.Size(shape[2:]).numel() // 4 ** (len(shape) - 2)
    noise = torch.rand(shape[0], num_patches)
    first = model(pixels, noise=noise)
    masked = pixel_mask(first.mask, pixels.shape, 4)
    assert 0.5 < masked.mean() < 1
    second = model(pixels + 10 * masked * torch.randn_like(pixels), noise=noise)
    torch.testing.assert_close(first.last_hidden_state, second.last_hidden_state, rtol=0, atol=0)


def test_a_naive_stem_would_leak_masked_pixels():
    """The guard above is needed: tokenizing the unmasked image lets visible tokens see masked neighbours."""
    torch.manual_seed(0)
    embeddings = MedformerModel(make_tiny_config()).input_adaptformer.patch_embeddings
    pixels = torch.randn(1, 1, 28, 28)
    mask = torch.zeros(1, 49)
    mask[0, 0] = 1  # mask the first patch; its neighbour, patch 1, stays visible and its receptive field crosses over
    changed = pixels + 10 * pixel_mask(mask, pixels.shape, 4)
    assert (embeddings(pixels)[0, 1] - embeddings(changed)[0, 1]).abs().max() > 1e-3
