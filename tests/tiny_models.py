"""Tiny random-weight Stable Diffusion pipelines, built offline (no downloads) and saved in diffusers layout.

A base text-to-image pipeline (VAE factor 2, UNet sample size 32: native 64 px) and an upscaler in
the SD x4-upscaler layout (VAE factor 4, UNet in_channels 4 + 3, noise level as class label).
"""

from __future__ import annotations

import json
import string
import warnings
from pathlib import Path

import torch

EMBED = 32


def make_tokenizer(directory: Path):
    """A CLIP BPE tokenizer over single characters, written as vocab.json + merges.txt and loaded back."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ",.!?'-")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    return CLIPTokenizer.from_pretrained(directory)


def make_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=EMBED, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16, projection_dim=EMBED, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()


def _vae(blocks: int, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, layers_per_block=1, norm_num_groups=4, latent_channels=4,
        sample_size=64, scaling_factor=scaling_factor,
    ).eval()


def _unet(in_channels: int, sample_size: int, num_class_embeds=None):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=EMBED, norm_num_groups=8,
        attention_head_dim=8, num_class_embeds=num_class_embeds,
    ).eval()


def make_base(directory: Path) -> Path:
    """Save a tiny StableDiffusionPipeline to ``directory`` (safetensors) and return the path."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok = make_tokenizer(directory / "_tok")
    pipe = StableDiffusionPipeline(
        vae=_vae(2), text_encoder=make_text_encoder(len(tok)), tokenizer=tok, unet=_unet(4, 32),
        scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def make_upscaler(directory: Path) -> Path:
    """Save a tiny StableDiffusionUpscalePipeline (x4 layout) to ``directory`` and return the path."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    tok = make_tokenizer(directory / "_tok")
    pipe = StableDiffusionUpscalePipeline(
        vae=_vae(3, scaling_factor=0.08333), text_encoder=make_text_encoder(len(tok)), tokenizer=tok, unet=_unet(7, 16, num_class_embeds=351),
        low_res_scheduler=DDPMScheduler(), scheduler=DDIMScheduler(prediction_type="v_prediction", clip_sample=False),
        max_noise_level=350,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def make_sdxl(directory: Path) -> Path:
    """Save a tiny StableDiffusionXLPipeline (two text encoders, added time ids) to ``directory``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok = make_tokenizer(directory / "_tok")
    torch.manual_seed(0)
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=EMBED, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, projection_dim=EMBED, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * EMBED, norm_num_groups=8, attention_head_dim=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + EMBED,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(2), text_encoder=make_text_encoder(len(tok)), text_encoder_2=encoder_2, tokenizer=tok,
        tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler(),
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def _drawn(std: float, *modules) -> None:
    """The parameters of ``modules`` drawn from N(0, std), in order: a ControlNet's zero-initialised
    output projections (diffusers' ``zero_module``), which would make every residual 0."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.normal_(0, std)


def make_controlnet(unet, seed: int = 3):
    """A tiny ControlNet copied from ``unet``, whose conditioning embedding halves once (2 control px per
    latent px: the tiny base's VAE factor), with random output convolutions (``from_unet`` zeroes them,
    which would make every residual 0)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    _drawn(0.05, net.controlnet_down_blocks, net.controlnet_mid_block)
    return net


def _t5(vocab_size: int, width: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=37, num_layers=1,
                                   num_heads=2, decoder_start_token_id=0, pad_token_id=1)).eval()


def _vae16(scaling_factor: float, shift_factor: float):
    """A tiny 16-channel VAE with a shift factor, as SD3's and FLUX's (factor 2 here)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=16,
        sample_size=64, scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def make_flux(directory: Path) -> Path:
    """Save a tiny FluxPipeline (FLUX.1-dev's layout: guidance embedding, dynamic shift; CLIP and a T5
    encoder, both over the tiny character tokenizer) to ``directory``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok = make_tokenizer(directory / "_tok")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=EMBED,
                                         pooled_projection_dim=EMBED, guidance_embeds=True,
                                         axes_dims_rope=(4, 6, 6)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae16(0.3611, 0.1159), text_encoder=make_text_encoder(len(tok)),
                        tokenizer=tok, text_encoder_2=_t5(len(tok), EMBED), tokenizer_2=tok, transformer=transformer)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def make_sd3(directory: Path) -> Path:
    """Save a tiny StableDiffusion3Pipeline (two CLIP encoders with projections and a T5) to ``directory``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok = make_tokenizer(directory / "_tok")

    def clip(seed):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=EMBED, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=16, projection_dim=EMBED, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=2 * EMBED,
                                        caption_projection_dim=16, pooled_projection_dim=2 * EMBED, out_channels=16,
                                        pos_embed_max_size=48).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae16(1.5305, 0.0609), text_encoder=clip(1), tokenizer=tok, text_encoder_2=clip(2), tokenizer_2=tok,
        text_encoder_3=_t5(len(tok), 2 * EMBED), tokenizer_3=tok)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def make_gligen_base(directory: Path) -> Path:
    """Save a tiny GLIGEN base (the tiny base's UNet with gated self-attention and a box projection;
    its gates opened, since GLIGEN initialises them shut) to ``directory``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = make_tokenizer(directory / "_tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=EMBED, norm_num_groups=8, attention_head_dim=8, attention_type="gated",
    ).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith(("alpha_attn", "alpha_dense")):
                p.fill_(0.5)
    pipe = StableDiffusionPipeline(
        vae=_vae(2), text_encoder=make_text_encoder(len(tok)), tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


# ---------------------------------------------------------------------- single-file (original) layouts
def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """(a, b) halves along dim 0 -> (b, a): the original MMDiT's adaLN order is shift, scale where
    diffusers' AdaLayerNormContinuous has scale, shift (the swap is its own inverse)."""
    a, b = weight.chunk(2)
    return torch.cat([b, a])


def sd3_original_layout(transformer) -> dict[str, torch.Tensor]:
    """A diffusers ``SD3Transformer2DModel``'s weights in the original MMDiT checkpoint layout (the keys
    of Stability's single-file ``sd3*.safetensors``, under ``model.diffusion_model.``), written here from
    the layout's definition so a test can make a single-file checkpoint of a tiny model: q, k, v fused
    into ``qkv``, the last block's context modulation and the final layer's in shift-scale order."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    last = transformer.config.num_layers - 1
    out = {"pos_embed": sd.pop("pos_embed.pos_embed")}
    simple = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
              "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
              "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "context_embedder": "context_embedder",
              "proj_out": "final_layer.linear"}
    for ours, theirs in simple.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = sd.pop(f"{ours}.{p}")
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(sd.pop(f"norm_out.linear.{p}"))
    for i in range(transformer.config.num_layers):
        src, dst = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}x_block.attn.qkv.{p}"] = torch.cat([sd.pop(f"{src}attn.to_{n}.{p}") for n in "qkv"])
            out[f"{dst}context_block.attn.qkv.{p}"] = torch.cat([sd.pop(f"{src}attn.add_{n}_proj.{p}") for n in "qkv"])
            out[f"{dst}x_block.attn.proj.{p}"] = sd.pop(f"{src}attn.to_out.0.{p}")
            out[f"{dst}x_block.adaLN_modulation.1.{p}"] = sd.pop(f"{src}norm1.linear.{p}")
            context = sd.pop(f"{src}norm1_context.linear.{p}")
            out[f"{dst}context_block.adaLN_modulation.1.{p}"] = _swap_halves(context) if i == last else context
            out[f"{dst}x_block.mlp.fc1.{p}"] = sd.pop(f"{src}ff.net.0.proj.{p}")
            out[f"{dst}x_block.mlp.fc2.{p}"] = sd.pop(f"{src}ff.net.2.{p}")
            if i != last:
                out[f"{dst}context_block.attn.proj.{p}"] = sd.pop(f"{src}attn.to_add_out.{p}")
                out[f"{dst}context_block.mlp.fc1.{p}"] = sd.pop(f"{src}ff_context.net.0.proj.{p}")
                out[f"{dst}context_block.mlp.fc2.{p}"] = sd.pop(f"{src}ff_context.net.2.{p}")
    assert not sd, f"not mapped: {sorted(sd)}"  # qk-norm and dual-attention (3.5) layers: not in the tiny model
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}


def make_flux_controlnet(transformer, seed: int = 4, directory: Path | None = None, **config):
    """A tiny FluxControlNetModel (InstantX's layout: its condition VAE-encoded) of a tiny FLUX
    ``transformer``'s widths, one double and one single block; its zero-initialised output projections
    (diffusers' ``zero_module``) drawn at random so it steers. Saved to ``directory`` when given."""
    from diffusers import FluxControlNetModel

    c = transformer.config
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # diffusers' own class imports its deprecated FluxPosEmbed
        warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)
        net = FluxControlNetModel(patch_size=1, in_channels=c.in_channels, num_layers=1, num_single_layers=1,
                                  attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
                                  joint_attention_dim=c.joint_attention_dim,
                                  pooled_projection_dim=c.pooled_projection_dim, guidance_embeds=c.guidance_embeds,
                                  axes_dims_rope=tuple(c.axes_dims_rope), **config).eval()
    _drawn(0.2, net.controlnet_blocks, net.controlnet_single_blocks, net.controlnet_x_embedder)
    if directory is not None:
        net.save_pretrained(directory, safe_serialization=True)
    return net


def make_sd3_controlnet(transformer, seed: int = 5, num_layers: int = 1, **config):
    """A tiny SD3ControlNetModel of a tiny SD3 ``transformer``'s widths (InstantX's layout by default:
    its own positional table, zero pooled projection), its zero-initialised input embedding and output
    projections drawn at random so it steers."""
    from diffusers import SD3ControlNetModel

    c = transformer.config
    torch.manual_seed(seed)
    net = SD3ControlNetModel(sample_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels,
                             num_layers=num_layers, attention_head_dim=c.attention_head_dim,
                             num_attention_heads=c.num_attention_heads, joint_attention_dim=c.joint_attention_dim,
                             caption_projection_dim=c.caption_projection_dim,
                             pooled_projection_dim=c.pooled_projection_dim, out_channels=c.out_channels,
                             pos_embed_max_size=c.pos_embed_max_size, **config).eval()
    _drawn(0.2, net.controlnet_blocks, net.pos_embed_input)
    return net
