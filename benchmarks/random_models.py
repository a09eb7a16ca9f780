"""Random-weight pipelines of the real architectures (SD 1.5 + the SD x4 upscaler, SDXL base), saved as
diffusers directories that ``anysize generate --base/--upscaler`` loads like downloaded checkpoints.

Random weights are honest for speed and memory (the same layers, shapes and kernels run) and say
nothing about image quality. No downloads: the configs are the published ones (UNet, VAE, CLIP text
encoder sizes), the tokenizer is anysize's word-level one padded to CLIP's 77 tokens.

    python benchmarks/random_models.py sd15 /tmp/models     # -> /tmp/models/sd15, /tmp/models/x4
    python benchmarks/random_models.py sdxl /tmp/models     # -> /tmp/models/sdxl
    python benchmarks/random_models.py flux /tmp/models     # -> /tmp/models/flux (FLUX.1-dev's sizes)
    python benchmarks/random_models.py sd3 /tmp/models      # -> /tmp/models/sd3 (SD3 medium's sizes)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiling import UNETS  # noqa: E402  (SD 1.5 and SDXL UNet configs)

# The SD x4 upscaler's UNet (stabilityai/stable-diffusion-x4-upscaler): 7 input channels (latent + the
# low-res RGB image), noise-level class labels, no self-attention in the first three attention blocks.
X4_UNET = dict(
    sample_size=128, in_channels=7, out_channels=4, layers_per_block=2, block_out_channels=(256, 512, 512, 1024),
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), cross_attention_dim=1024, attention_head_dim=8,
    only_cross_attention=(True, True, True, False), num_class_embeds=1000, use_linear_projection=True,
)
SD_VAE = dict(  # SD 1.x/2.x and SDXL: factor 8
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
)
X4_VAE = dict(  # the x4 upscaler's: factor 4
    block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, latent_channels=4, norm_num_groups=32,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     projection_dim=1280)


# FLUX.1-dev (black-forest-labs/FLUX.1-dev): 19 double-stream and 38 single-stream blocks, 3072 wide,
# the guidance embedding; its VAE: 16 latent channels, factor 8, a shift factor and no quant convs.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# SD3 medium (stabilityai/stable-diffusion-3-medium-diffusers): 24 joint blocks, 1536 wide, 192-patch table.
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
VAE16 = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16, norm_num_groups=32,
             use_quant_conv=False, use_post_quant_conv=False)
VAE16_SCALES = {"flux": dict(scaling_factor=0.3611, shift_factor=0.1159),
                "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609)}
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
FLUX_SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096, shift=3.0)


def transformer(arch: str):
    """The random-weight transformer of ``arch`` ("flux" or "sd3"), with its published sizes."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return FluxTransformer2DModel(**FLUX_TRANSFORMER) if arch == "flux" else SD3Transformer2DModel(**SD3_TRANSFORMER)


def vae16(arch: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE16, **VAE16_SCALES[arch])


def _t5(vocab: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, decoder_start_token_id=0, **T5_XXL))


def _tokenizer(directory: Path):
    from transformers import PreTrainedTokenizerFast

    from anysize.train.trainer import scene_vocabulary, word_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = word_tokenizer(scene_vocabulary(), Path(tmp))
    tok.model_max_length = 77
    tok.save_pretrained(directory)
    return PreTrainedTokenizerFast.from_pretrained(directory)


def _text_encoder(config: dict, vocab: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, max_position_embeddings=77, hidden_act="gelu", **config)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build(arch: str, out: Path, dtype: torch.dtype = torch.float16) -> list[Path]:
    """Save the random pipelines of ``arch`` under ``out``; returns their directories (base first)."""
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    # initialise on the GPU where there is one: SDXL's 3.5B fp32 parameters take minutes and 14 GB on a CPU
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return _build(arch, out, dtype)


def _build(arch: str, out: Path, dtype: torch.dtype) -> list[Path]:
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                           StableDiffusionPipeline, StableDiffusionUpscalePipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    sd_sched = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    tok = _tokenizer(out / "tokenizer")
    made = []
    if arch == "sd15":
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE, scaling_factor=0.18215), unet=UNet2DConditionModel(**UNETS["sd15"]),
            text_encoder=_text_encoder(CLIP_L, len(tok)), tokenizer=tok,
            scheduler=DPMSolverMultistepScheduler(**sd_sched), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        made.append(_save(pipe, out / "sd15", dtype))
        x4 = StableDiffusionUpscalePipeline(
            vae=AutoencoderKL(**X4_VAE, scaling_factor=0.08333), unet=UNet2DConditionModel(**X4_UNET),
            text_encoder=_text_encoder(OPENCLIP_H, len(tok)), tokenizer=tok,
            scheduler=DDIMScheduler(**sd_sched, prediction_type="v_prediction"),
            low_res_scheduler=DDPMScheduler(), max_noise_level=350)
        made.append(_save(x4, out / "x4", dtype))
    elif arch == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SD_VAE, scaling_factor=0.13025), unet=UNet2DConditionModel(**UNETS["sdxl"]),
            text_encoder=_text_encoder(CLIP_L, len(tok)), text_encoder_2=_text_encoder(OPENCLIP_BIGG, len(tok), True),
            tokenizer=tok, tokenizer_2=tok, scheduler=DPMSolverMultistepScheduler(**sd_sched))
        made.append(_save(pipe, out / "sdxl", dtype))
    elif arch == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae16("flux"),
                            text_encoder=_text_encoder(CLIP_L, len(tok)), tokenizer=tok, text_encoder_2=_t5(len(tok)),
                            tokenizer_2=tok, transformer=transformer("flux"))
        made.append(_save(pipe, out / "flux", dtype))
    elif arch == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(
            transformer=transformer("sd3"), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae16("sd3"),
            text_encoder=_text_encoder({**CLIP_L, "projection_dim": 768}, len(tok), True), tokenizer=tok,
            text_encoder_2=_text_encoder(OPENCLIP_BIGG, len(tok), True), tokenizer_2=tok,
            text_encoder_3=_t5(len(tok)), tokenizer_3=tok)
        made.append(_save(pipe, out / "sd3", dtype))
    else:
        raise ValueError(f"arch={arch!r}: sd15, sdxl, flux or sd3")
    return made


def _save(pipe, directory: Path, dtype: torch.dtype) -> Path:
    pipe.to(dtype=dtype)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("arch", choices=("sd15", "sdxl", "flux", "sd3"))
    p.add_argument("out", type=Path)
    args = p.parse_args()
    for d in build(args.arch, args.out):
        print(d)


if __name__ == "__main__":
    main()
