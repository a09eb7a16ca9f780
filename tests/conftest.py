"""Tiny random-weight diffusers components, built offline in fixtures."""

import os

# MKL's GEMM takes another code path for small batches unless strict reproducibility is on; set it
# before torch loads so outputs can be compared bit for bit across tile batch sizes (README: Determinism).
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402

EMBED_DIM = 32


def make_unet(in_channels: int = 4, *, sample_size: int = 16, num_class_embeds: int | None = None):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=EMBED_DIM,
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()


@pytest.fixture(scope="session")
def unet():
    return make_unet()


@pytest.fixture(scope="session")
def sr_unet():
    """SD x4-upscaler layout: latent + 3 low-res image channels, noise level as class label."""
    return make_unet(in_channels=7, num_class_embeds=1000)


@pytest.fixture
def embeds():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 5, EMBED_DIM, generator=g), torch.randn(1, 5, EMBED_DIM, generator=g)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """(base, upscaler) directories of tiny random-weight diffusers pipelines, saved as safetensors."""
    import tiny_models

    root = tmp_path_factory.mktemp("models")
    return tiny_models.make_base(root / "base"), tiny_models.make_upscaler(root / "upscaler")


@pytest.fixture(scope="session")
def pipe(model_dirs):
    from anysize import AnySizePipeline

    p = AnySizePipeline.from_pretrained(base=model_dirs[0], upscaler=model_dirs[1], device="cpu")
    p.set_progress_bar_config(disable=True)
    return p
