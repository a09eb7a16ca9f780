"""Aspect-ratio bucketed diffusion training (ARAD, Zheng et al. 2023, sec. 3.2): one code path for
the VAE, a text-to-image base model (ARAD buckets or the square-only baseline), the x4
super-resolution model (SD x4-upscaler layout), a ControlNet of a trained base model (the scene's
object silhouettes as its condition) and fine-tuning an existing Stable Diffusion model on a folder
of captioned images.

Every batch comes from one bucket of :mod:`anysize.buckets` (the module inference uses). Models are
diffusers / transformers components saved in diffusers layout, so what this trains loads through
the same path as Stable Diffusion. Checkpoints are written atomically every ``checkpoint_every``
steps; a run started again with the same ``output_dir`` resumes from the last one.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..buckets import Bucket, arad_buckets, model_granularity, native_side, nearest_bucket
from ..models import component_dir
from .scenes import (BACKGROUND_PHRASES, COLORS, NUMBER_WORDS, PATTERNS, PLURALS, SHAPES, SIZES, object_boxes,
                     object_phrase, render, render_crop, render_mask, sample_scene)
from ..core.grounding import MAX_OBJECTS, is_gligen_parameter, phrase_embeddings
from ..core.vae import vae_scale_factor
from ..io.atomic import atomic_write, replace_dir

TASKS = ("vae", "base", "upscaler", "controlnet", "gligen")
CONTROL_CAPTION_DROP = 0.3  # share of ControlNet batches' captions left empty: it must also work from the mask alone
GLIGEN_GROUNDING_DROP = 0.1  # share of GLIGEN images trained without their grounding
# GLIGEN's gates at the start of training: tanh(1.0) = 0.76 open, the gated layers' output projections
# zeroed instead, so the UNet still starts as the base. With the paper's shut gates (tanh(0)) and random
# layers, two CPU runs (runs/gligen, runs/gligen-lr1e-3) left the gates at |alpha| < 0.05 after 1200
# steps: a shut gate gives its layers no gradient, and the random layers' output gives the gate none
# that points anywhere.
GLIGEN_GATE_INIT = 1.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class TrainConfig:
    """One training run. Sizes in image pixels.

    task: "vae" (autoencoder), "base" (text-to-image), "upscaler" (x4 super-resolution), "controlnet"
        (a ControlNet of the ``init`` base model, which stays frozen, on the scenes' object silhouettes:
        :func:`anysize.train.scenes.render_mask`).
    output_dir: checkpoints and the final diffusers directory (``output_dir / "model"``).
    init: a diffusers directory to start from (fine-tuning); None builds a new small model.
    vae: a trained VAE directory for "base"/"upscaler" on new models (the VAE stays frozen).
    data: "scenes" (the procedural domain) or a folder of images with same-name ``.txt`` captions.
    buckets: "arad" (the paper's nine ratios) or "square" (the baseline that shows the composition problem).
    resolution: the base model's native side: buckets hold about ``resolution**2`` pixels. None: the
        ``init`` model's (its UNet's ``sample_size`` times the VAE factor), else 64. A "base" fine-tune at
        another side re-registers the UNet's ``sample_size``, so the pipeline samples at the new buckets.
    crop: upscaler only: side of the high-resolution training crops (the low-res input is crop / 4).
    workers: processes that render the procedural scenes (0: in the training process). Rendering is
        plain numpy on the CPU, so on a GPU it can leave the model waiting (``log.jsonl`` says how long).
    max_minutes: stop after this much training time (checkpoint, then export); a later run with the
        same ``output_dir`` resumes towards ``steps``.
    final_t_fraction: "base" / "upscaler": the fraction of each batch trained at the last timestep
        (the rest uniform over all of them). A one-step sampler evaluates the model there only: at
        ``T - 1`` the sample is almost pure noise, so the prediction is the model's estimate of the
        clean latent from the condition alone (the mean of what fits it, which is what PSNR rewards).
    min_t_fraction: draw training timesteps from ``[min_t_fraction * T, T)`` only (0: all of them).
        GLIGEN's gated layers act in the first ``gligen_scheduled_sampling_beta`` of stage 1's steps
        (0.3 by default: the noisiest timesteps, where the layout is decided), so a "gligen" run spends
        its steps there; at low timesteps the epsilon loss is all texture and says nothing of where.
    box_weight: "gligen" only: the loss inside the grounded objects' boxes weighs ``1 + box_weight``
        times the loss outside them (0: the plain epsilon loss). Where the objects are is what grounding
        must learn; most of a scene's pixels are background.
    decoder_only: "vae" only, with ``init``: train the decoder and keep the encoder (and its
        ``scaling_factor``) as they are, so the latents of models trained on this VAE stay valid. This is
        how a shipped VAE is sharpened without retraining the UNets that sample its latents.
    """

    task: str
    output_dir: Path
    init: Path | None = None
    vae: Path | None = None
    data: str = "scenes"
    buckets: str = "arad"
    resolution: int | None = None
    crop: int = 128
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    seed: int = 0
    max_noise_level: int = 350
    workers: int = 0
    max_minutes: float | None = None
    progress: bool = True
    decoder_only: bool = False
    final_t_fraction: float = 0.0
    box_weight: float = 0.0
    min_t_fraction: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: must be one of {', '.join(TASKS)}")
        if self.buckets not in ("arad", "square"):
            raise ValueError(f"buckets={self.buckets!r}: must be 'arad' or 'square'")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers={self.workers!r}: must be a non-negative integer")
        if not 0.0 <= self.min_t_fraction < 1.0:
            raise ValueError(f"min_t_fraction={self.min_t_fraction!r}: must be in [0, 1)")
        if not 0.0 <= self.final_t_fraction <= 1.0:
            raise ValueError(f"final_t_fraction={self.final_t_fraction!r}: must be in [0, 1]")
        if not (math.isfinite(self.box_weight) and self.box_weight >= 0):
            raise ValueError(f"box_weight={self.box_weight!r}: must be a finite number >= 0")
        if self.box_weight and self.task != "gligen":
            raise ValueError(f"box_weight: only for task 'gligen' (got task {self.task!r})")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes={self.max_minutes!r}: must be positive")
        for name in ("resolution", "crop", "steps", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if name == "resolution" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.task == "upscaler" and self.crop % 16:
            raise ValueError(f"crop={self.crop}: must be a multiple of 16 (x4 input through a factor-4 VAE)")
        if self.task == "controlnet" and (self.init is None or self.data != "scenes"):
            raise ValueError("task 'controlnet': needs init (the base model it steers) and data 'scenes' "
                             "(its condition, the object silhouettes, comes from the scene renderer)")
        if self.task == "gligen" and (self.init is None or self.data != "scenes"):
            raise ValueError("task 'gligen': needs init (the base model it grounds) and data 'scenes' "
                             "(the phrases and boxes come from the scene renderer)")
        if self.decoder_only and (self.task != "vae" or self.init is None):
            raise ValueError("decoder_only: needs task 'vae' and init (the VAE whose encoder stays frozen)")
        if self.data != "scenes" and not Path(self.data).is_dir():
            raise ValueError(f"data={self.data!r}: must be 'scenes' or a folder of images with .txt captions")


# ---------------------------------------------------------------------------------------------- data
def scene_vocabulary() -> list[str]:
    """Every word the scene captions use (for a word-level tokenizer)."""
    words = {"and", "a", ","} | set(NUMBER_WORDS.values()) | set(SIZES) | set(COLORS) | set(SHAPES)
    words |= set(PLURALS.values()) | {p for p in PATTERNS if p != "plain"}
    for phrase in BACKGROUND_PHRASES.values():
        words |= set(phrase.split())
    return sorted(words)


def train_buckets(config: TrainConfig, granularity: int) -> list[Bucket]:
    """The buckets batches are drawn from: ARAD's nine ratios, or the square alone."""
    area = config.resolution**2
    return arad_buckets(area, granularity) if config.buckets == "arad" else [(config.resolution, config.resolution)]


def _render_job(job: tuple) -> np.ndarray:
    scene, w, h, box = job
    return render(scene, w, h) if box is None else render_crop(scene, w, h, box)


class SceneData:
    """Procedural scenes rendered at a bucket's size: an endless, seeded stream.

    Scenes and crop boxes are drawn from the seeded generator here, in order; only the rendering (pure
    in its inputs) goes to ``pool`` when one is given, so the stream is the same with or without it.
    """

    def __init__(self, seed: int, pool=None):
        self.rng = np.random.default_rng(seed)
        self.pool = pool

    def _render(self, jobs: list[tuple]) -> np.ndarray:
        if self.pool is None:
            return np.stack([_render_job(j) for j in jobs])
        return np.stack(list(self.pool.map(_render_job, jobs, chunksize=max(1, len(jobs) // 32))))

    def batch(self, bucket: Bucket, n: int, masks: bool = False, boxes: bool = False):
        """``n`` scenes at ``bucket``: (images, captions), and their silhouettes (:func:`render_mask`)
        with ``masks``, or with ``boxes`` per image its objects' ``((x0, y0, x1, y1), phrase)``, the box
        in fractions of the image, clipped (:func:`grounding`)."""
        w, h = bucket
        scenes = [sample_scene(self.rng, h / w) for _ in range(n)]
        images, captions = self._render([(s, w, h, None) for s in scenes]), [s.caption for s in scenes]
        if boxes:
            return images, captions, [grounding(s, w, h) for s in scenes]
        if not masks:
            return images, captions
        return images, captions, np.stack([render_mask(s, w, h) for s in scenes])

    def crops(self, size: int, n: int, scale_range=(2.0, 8.0)) -> np.ndarray:
        """Random ``size`` crops of scenes rendered at several times ``size`` (super-resolution data)."""
        jobs = []
        for _ in range(n):
            scene = sample_scene(self.rng, float(np.exp(self.rng.uniform(math.log(0.5), math.log(2.0)))))
            side = int(size * self.rng.uniform(*scale_range))
            w, h = scene.size_for(side * side)
            w, h = max(w, size), max(h, size)
            top, left = int(self.rng.integers(0, h - size + 1)), int(self.rng.integers(0, w - size + 1))
            jobs.append((scene, w, h, (top, left, top + size, left + size)))
        return self._render(jobs)


def grounding(scene, width: int, height: int) -> list[tuple[tuple[float, float, float, float], str]]:
    """A scene's objects as GLIGEN phrases and boxes: ``((x0, y0, x1, y1), "a big red circle")``, the
    box (the object's bounding square, :func:`~anysize.train.scenes.object_boxes`) in fractions of the
    image, clipped to it."""
    out = []
    for obj, (top, left, bottom, right) in zip(scene.objects, object_boxes(scene, width, height)):
        box = (max(0.0, left / width), max(0.0, top / height), min(1.0, right / width), min(1.0, bottom / height))
        out.append((box, object_phrase(obj)))
    return out


def box_mask(boxes: torch.Tensor, masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(n, 1, height, width)``: 1 where a pixel's centre lies in one of the image's boxes whose mask is
    1 (``boxes`` ``(n, k, 4)`` as ``(x0, y0, x1, y1)`` in fractions), else 0."""
    ys = (torch.arange(height, device=boxes.device) + 0.5) / height
    xs = (torch.arange(width, device=boxes.device) + 0.5) / width
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))
    inside = (xs >= x0) & (xs < x1) & (ys[:, None] >= y0) & (ys[:, None] < y1) & (masks[..., None, None] > 0)
    return inside.any(dim=1, keepdim=True).to(boxes.dtype)


class FolderData:
    """A folder of images with same-name ``.txt`` captions (kohya style), sorted into buckets."""

    def __init__(self, folder: str | Path, buckets: list[Bucket], seed: int):
        self.rng = np.random.default_rng(seed)
        self.items: dict[Bucket, list[tuple[Path, str]]] = {}
        for path in sorted(Path(folder).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            caption_file = path.with_suffix(".txt")
            caption = caption_file.read_text().strip() if caption_file.is_file() else ""
            with PIL.Image.open(path) as im:
                bucket = nearest_bucket(*im.size, buckets)
            self.items.setdefault(bucket, []).append((path, caption))
        if not self.items:
            raise ValueError(f"data={str(folder)!r}: no images ({', '.join(IMAGE_SUFFIXES)}) found")

    def weights(self, buckets: list[Bucket]) -> np.ndarray:
        counts = np.array([len(self.items.get(b, [])) for b in buckets], dtype=np.float64)
        return counts / counts.sum()

    def crops(self, size: int, n: int, scale_range=(1.0, 1.0)) -> np.ndarray:
        """Random ``size`` crops of random images (enlarged first where smaller than ``size``)."""
        paths = [p for items in self.items.values() for p, _ in items]
        out = []
        for i in self.rng.integers(0, len(paths), n):
            with PIL.Image.open(paths[i]) as im:
                im = im.convert("RGB")
                scale = max(1.0, size / min(im.size))
                if scale > 1:
                    im = im.resize((math.ceil(im.width * scale), math.ceil(im.height * scale)), PIL.Image.Resampling.LANCZOS)
                left, top = int(self.rng.integers(0, im.width - size + 1)), int(self.rng.integers(0, im.height - size + 1))
                out.append(np.asarray(im.crop((left, top, left + size, top + size))))
        return np.stack(out)

    def batch(self, bucket: Bucket, n: int) -> tuple[np.ndarray, list[str]]:
        items = self.items[bucket]
        picks = [items[i] for i in self.rng.integers(0, len(items), n)]
        return np.stack([_fit(p, bucket) for p, _ in picks]), [c for _, c in picks]


def _fit(path: Path, bucket: Bucket) -> np.ndarray:
    """Resize to cover ``bucket`` and centre-crop to it."""
    with PIL.Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(bucket[0] / im.width, bucket[1] / im.height)
        im = im.resize((max(bucket[0], round(im.width * scale)), max(bucket[1], round(im.height * scale))),
                       PIL.Image.Resampling.LANCZOS)
        left, top = (im.width - bucket[0]) // 2, (im.height - bucket[1]) // 2
        return np.asarray(im.crop((left, top, left + bucket[0], top + bucket[1])))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- models
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|unk|>")


def word_tokenizer(words: list[str], directory: Path):
    """A word-level tokenizer (one token a word, ids in sorted order: deterministic) in transformers'
    fast-tokenizer format, with CLIP's start/end tokens; unknown words map to ``<|unk|>``.

    Not BPE: the domain has ~50 words, and BPE merges trained on so few words tie, so their order
    (and the ids) would change from run to run.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|unk|>", model_max_length=32)
    fast.save_pretrained(directory)
    return PreTrainedTokenizerFast.from_pretrained(directory)


def new_text_encoder(vocab_size: int, width: int = 128, layers: int = 3):
    """A small CLIP text transformer, trained jointly with the UNet (as latent diffusion's first text-to-image model)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_attention_heads=4,
        num_hidden_layers=layers, max_position_embeddings=32, projection_dim=width,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))


def new_vae():
    """A small KL autoencoder, factor 4, 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=16,
        mid_block_add_attention=False,
    )


def new_unet(sample_size: int, in_channels: int, cross_attention_dim: int, num_class_embeds: int | None = None,
             layers_per_block: int = 2):
    """A small text-conditioned UNet (9.1M parameters at 2 layers a block, 6.2M at 1); ``in_channels = 7``
    and class labels for the x4 upscaler layout. Sized so a base and an upscaler ship in 40 MB at fp16."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=(48, 96, 144), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=16, num_class_embeds=num_class_embeds,
    )


# ---------------------------------------------------------------------------------------------- training
class Trainer:
    """Builds the components for ``config.task``, trains with EMA, checkpoints, resumes and exports."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        self.config = config
        self.accelerator = Accelerator()
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             prediction_type="v_prediction" if config.task == "upscaler" else "epsilon")
        # noise augmentation of the x4 input: the SD x4 upscaler's schedule, exported as its low_res_scheduler
        self.low_res_scheduler = DDPMScheduler()
        self._build()
        self.device = self.accelerator.device
        for m in self.trainable + self.frozen:
            m.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # the matrix units' fp32 mode: ~1e-3 relative error
            torch.backends.cudnn.allow_tf32 = True
        params = [p for m in self.trainable for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
        self.ema = EMAModel(params, decay=config.ema_decay)
        self.step = 0
        self._seconds: dict[str, float] = {}  # seconds spent per kind since step _seconds_from
        self._seconds_from = 0
        self.buckets = train_buckets(config, granularity=self._granularity())
        self.pool = None
        if config.workers and config.data == "scenes":
            import concurrent.futures
            import multiprocessing

            self.pool = concurrent.futures.ProcessPoolExecutor(
                config.workers, mp_context=multiprocessing.get_context("forkserver"))
        self.data = (SceneData(config.seed, self.pool) if config.data == "scenes"
                     else FolderData(config.data, self.buckets, config.seed))
        self._resume()

    # -- components
    def _build(self) -> None:
        c = self.config
        if c.resolution is None and (c.task != "base" or c.init is None):
            c.resolution = 64  # else the init model's native side, read from its UNet below
        if c.task == "vae":
            self.vae = self._load("vae", new_vae)
            self.trainable, self.frozen = [self.vae], []
            if c.decoder_only:
                self.vae.requires_grad_(False)
                self.trainable = [self.vae.post_quant_conv, self.vae.decoder]
                for m in self.trainable:
                    m.requires_grad_(True)
                self.frozen = [self.vae]
            return
        self.vae = self._load("vae", new_vae, source=c.vae)
        self.vae.requires_grad_(False)
        if c.init is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(Path(c.init) / "tokenizer")
        else:
            self.tokenizer = word_tokenizer(scene_vocabulary(), c.output_dir / "tokenizer")
        self.text_encoder = self._load("text_encoder", lambda: new_text_encoder(len(self.tokenizer)))
        dim = self.text_encoder.config.hidden_size
        if c.task == "controlnet":
            self._build_controlnet()
            return
        if c.task == "gligen":
            self._build_gligen()
            return
        if c.task == "base":
            self.unet = self._load("unet", lambda: new_unet(c.resolution // self._factor(), 4, dim))
            native = native_side(self.vae, self.unet)
            if c.resolution is None:
                c.resolution = native
            elif c.resolution != native:
                # fine-tuning at another native size: the exported UNet says so, so that the pipeline's
                # buckets (sample_size x VAE factor) follow what the model was trained at
                self.unet.register_to_config(sample_size=c.resolution // self._factor())
        else:
            if self._factor() != 4:
                raise ValueError(f"vae: factor {self._factor()}; the x4 upscaler layout needs a factor-4 VAE")
            self.unet = self._load("unet", lambda: new_unet(c.crop // 4, 7, dim, c.max_noise_level + 1, layers_per_block=1))
        # a new text encoder learns with the UNet; a pretrained one (fine-tuning) stays frozen
        train_text = c.init is None
        self.text_encoder.requires_grad_(train_text)
        self.trainable = [self.unet] + ([self.text_encoder] if train_text else [])
        self.frozen = [self.vae] + ([] if train_text else [self.text_encoder])

    def _build_controlnet(self) -> None:
        """The init base model frozen; a ControlNet copied from its UNet's encoder (diffusers'
        ``from_unet``: zero-initialised output convolutions, so training starts from the base model's
        own output), whose condition embedding reduces by the VAE factor."""
        from diffusers import ControlNetModel

        c = self.config
        self.unet = self._load("unet", None)
        c.resolution = native_side(self.vae, self.unet)
        channels = (16, 32, 64, 128, 256)[: int(math.log2(self._factor())) + 1]
        self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=channels)
        for m in (self.unet, self.text_encoder):
            m.requires_grad_(False)
        self.trainable, self.frozen = [self.controlnet], [self.vae, self.text_encoder, self.unet]

    def _build_gligen(self) -> None:
        """The init base model's UNet with GLIGEN's gated self-attention added (diffusers'
        ``attention_type="gated"`` and its box projection), every base weight loaded and frozen: only the
        new layers train. Their gates start open (:data:`GLIGEN_GATE_INIT`) and their attention's and
        feed-forward's output projections at zero, so training starts from the base model's own output
        and every new layer gets a gradient from the first step (a zero projection still learns; a shut
        gate's layers do not). Its EMA and checkpoints hold the whole UNet (the frozen part stays as it is)."""
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention import GatedSelfAttentionDense

        c = self.config
        base = self._load("unet", None)
        c.resolution = native_side(self.vae, base)
        self.unet = UNet2DConditionModel.from_config({**base.config, "attention_type": "gated"})
        missing, unexpected = self.unet.load_state_dict(base.state_dict(), strict=False)
        new = [k for k in missing if not is_gligen_parameter(k)]
        if unexpected or new:
            raise RuntimeError(f"gligen: the gated UNet does not take the base's weights ({(unexpected + new)[:3]})")
        with torch.no_grad():
            for module in self.unet.modules():
                if isinstance(module, GatedSelfAttentionDense):
                    module.alpha_attn.fill_(GLIGEN_GATE_INIT)
                    module.alpha_dense.fill_(GLIGEN_GATE_INIT)
                    for out in (module.attn.to_out[0], module.ff.net[-1]):
                        out.weight.zero_()
                        out.bias.zero_()
        for name, p in self.unet.named_parameters():
            p.requires_grad_(is_gligen_parameter(name))
        self.text_encoder.requires_grad_(False)
        self.trainable, self.frozen = [self.unet], [self.vae, self.text_encoder]

    def _factor(self) -> int:
        return vae_scale_factor(self.vae)

    def _granularity(self) -> int:
        unet = getattr(self, "unet", None)
        return model_granularity(self.vae, unet) if unet is not None else self._factor()

    def _load(self, name: str, make, source: Path | None = None):
        """``name`` from ``source`` or ``config.init`` (a diffusers directory), else a new model."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        classes = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}
        root = source if source is not None else self.config.init
        if root is None:
            return make()
        # fp32 whatever the saved dtype: the shipped default model is fp16, and transformers keeps a
        # saved fp16 text encoder in fp16, which a fp32 UNet's cross-attention cannot take
        return classes[name].from_pretrained(component_dir(root, name), use_safetensors=True, dtype=torch.float32)

    # -- where the time goes: data (scene rendering, on the CPU) against the whole step, per checkpoint
    @contextlib.contextmanager
    def _timing(self, what: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[what] = self._seconds.get(what, 0.0) + time.perf_counter() - start

    def _time_split(self) -> dict:
        """Mean seconds per step since the last checkpoint: all of it, and the data part."""
        steps = max(1, self.step - self._seconds_from)
        out = {f"{k}_s_per_step": round(v / steps, 4) for k, v in self._seconds.items()}
        self._seconds, self._seconds_from = {}, self.step
        return out

    # -- data and losses
    def _bucket(self) -> Bucket:
        if isinstance(self.data, FolderData):
            return self.buckets[int(self.rng.choice(len(self.buckets), p=self.data.weights(self.buckets)))]
        return self.buckets[int(self.rng.integers(len(self.buckets)))]

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(images).latent_dist.sample() * self.vae.config.scaling_factor

    def loss(self) -> torch.Tensor:
        c, device = self.config, self.device
        if c.task == "vae":
            with self._timing("data"):
                images = to_tensor(self.data.crops(c.resolution, c.batch_size, scale_range=(1.0, 4.0))).to(device)
            with torch.no_grad() if c.decoder_only else contextlib.nullcontext():
                posterior = self.vae.encode(images).latent_dist
            recon = self.vae.decode(posterior.sample()).sample
            error = F.l1_loss(recon, images) + F.mse_loss(recon, images)
            return error if c.decoder_only else error + 1e-6 * posterior.kl().mean()
        if c.task == "controlnet":
            return self._controlnet_loss()
        if c.task == "gligen":
            return self._gligen_loss()
        if c.task == "base":
            with self._timing("data"):
                images, captions = self.data.batch(self._bucket(), c.batch_size)
            captions = [t if self.rng.random() > 0.1 else "" for t in captions]  # for classifier-free guidance
            latents, cond = self._latents(to_tensor(images).to(device)), None
        else:
            with self._timing("data"):
                high = self.data.crops(c.crop, c.batch_size)
            low = F.avg_pool2d(to_tensor(high), 4)
            level = torch.randint(0, c.max_noise_level + 1, (c.batch_size,))
            cond = self.low_res_scheduler.add_noise(low, torch.randn_like(low), level).to(device)
            latents, captions = self._latents(to_tensor(high).to(device)), [""] * c.batch_size
        noise = torch.randn_like(latents)
        T = self.noise_scheduler.config.num_train_timesteps
        t = self._timesteps(latents.shape[0])
        if c.final_t_fraction:
            t = torch.where(torch.rand(t.shape, device=device) < c.final_t_fraction, T - 1, t)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = noise if c.task == "base" else self.noise_scheduler.get_velocity(latents, noise, t)
        x = noisy if cond is None else torch.cat([noisy, cond], dim=1)
        labels = None if cond is None else level.to(device)
        pred = self.unet(x, t, encoder_hidden_states=self._encode_text(captions), class_labels=labels).sample
        return F.mse_loss(pred, target)

    def _timesteps(self, n: int) -> torch.Tensor:
        """``n`` training timesteps, uniform over ``[min_t_fraction * T, T)``."""
        T = self.noise_scheduler.config.num_train_timesteps
        return torch.randint(int(self.config.min_t_fraction * T), T, (n,), device=self.device)

    def _controlnet_loss(self) -> torch.Tensor:
        """The frozen base model's epsilon loss with the ControlNet's residuals added, the silhouettes
        (in [0, 1], as diffusers' ControlNet pipelines feed a control image) as its condition."""
        c, device = self.config, self.device
        with self._timing("data"):
            images, captions, masks = self.data.batch(self._bucket(), c.batch_size, masks=True)
        captions = [t if self.rng.random() > CONTROL_CAPTION_DROP else "" for t in captions]
        latents = self._latents(to_tensor(images).to(device))
        cond = torch.from_numpy(masks).permute(0, 3, 1, 2).float().div(255.0).to(device)
        noise = torch.randn_like(latents)
        t = self._timesteps(latents.shape[0])
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        with torch.no_grad():
            text = self._encode_text(captions)
        down, mid = self.controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        pred = self.unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        return F.mse_loss(pred, noise)

    def _gligen_loss(self) -> torch.Tensor:
        """The epsilon loss with every object's phrase grounded to its box (fractions of the image, the
        CLIP pooled phrase embeddings, as diffusers' GLIGEN pipeline feeds them); captions dropped as for
        ControlNet, the grounding dropped (masks 0) one time in ten, so the model also keeps its plain
        output."""
        c, device = self.config, self.device
        with self._timing("data"):
            images, captions, grounding = self.data.batch(self._bucket(), c.batch_size, boxes=True)
        captions = [t if self.rng.random() > CONTROL_CAPTION_DROP else "" for t in captions]
        latents = self._latents(to_tensor(images).to(device))
        n = latents.shape[0]
        boxes = torch.zeros(n, MAX_OBJECTS, 4, device=device)
        embeds = torch.zeros(n, MAX_OBJECTS, self.unet.config.cross_attention_dim, device=device)
        masks = torch.zeros(n, MAX_OBJECTS, device=device)
        with torch.no_grad():
            text = self._encode_text(captions)
            for i, objects in enumerate(grounding):
                if not objects or self.rng.random() < GLIGEN_GROUNDING_DROP:
                    continue
                objects = objects[:MAX_OBJECTS]
                embeds[i, : len(objects)] = phrase_embeddings(self.tokenizer, self.text_encoder,
                                                              [p for _, p in objects])
                boxes[i, : len(objects)] = torch.tensor([b for b, _ in objects], device=device)
                masks[i, : len(objects)] = 1
        noise = torch.randn_like(latents)
        t = self._timesteps(n)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        gligen = {"boxes": boxes, "positive_embeddings": embeds, "masks": masks}
        pred = self.unet(noisy, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": gligen}).sample
        if not c.box_weight:
            return F.mse_loss(pred, noise)
        weight = 1.0 + c.box_weight * box_mask(boxes, masks, *latents.shape[-2:])
        return ((pred - noise) ** 2 * weight).mean() / weight.mean()

    # -- loop
    def run(self) -> Path:
        try:
            return self._run()
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)

    def _run(self) -> Path:
        c = self.config
        bar = tqdm(total=c.steps, initial=self.step, desc=f"train {c.task}", unit="step", disable=not c.progress)
        smooth = None
        for m in self.trainable:
            m.train()
        deadline = None if c.max_minutes is None else time.monotonic() + 60 * c.max_minutes
        while self.step < c.steps:
            with self._timing("step"):
                loss = self.loss()
                self.optimizer.zero_grad(set_to_none=True)
                self.accelerator.backward(loss)
                torch.nn.utils.clip_grad_norm_([p for m in self.trainable for p in m.parameters()], 1.0)
                self.optimizer.step()
                self.ema.step([p for m in self.trainable for p in m.parameters()])
                value = loss.item()  # waits for the device: the step's time is all in
            self.step += 1
            smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
            bar.set_postfix(loss=f"{smooth:.4f}")
            bar.update(1)
            out_of_time = deadline is not None and time.monotonic() > deadline
            if self.step % c.checkpoint_every == 0 or self.step == c.steps or out_of_time:
                self.save_checkpoint(smooth)
            if out_of_time:
                bar.write(f"train {c.task}: max_minutes={c.max_minutes} reached at step {self.step}; "
                          "run again with the same output directory to continue")
                break
        bar.close()
        return self.export()

    # -- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.config.output_dir / "checkpoint.pt"

    def save_checkpoint(self, loss: float | None = None) -> None:
        """Weights, optimizer, EMA, step and RNG states, written to a temp file and renamed."""
        state = {
            "step": self.step,
            "modules": [m.state_dict() for m in self.trainable],
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": json.dumps(self.rng.bit_generator.state),
            "data_rng": json.dumps(self.data.rng.bit_generator.state),
            "config": json.dumps({k: str(v) for k, v in asdict(self.config).items()}),
        }
        self.config.output_dir.mkdir(parents=True, exist_ok=True)
        # a crash leaves the old or the new checkpoint, never half of one
        atomic_write(self.checkpoint_path, lambda f: torch.save(state, f))
        log = {"step": self.step, "loss": loss, "time": time.time(), **self._time_split()}
        with open(self.config.output_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(log) + "\n")

    def _resume(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        for module, sd in zip(self.trainable, state["modules"]):
            module.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.ema.to(self.device)
        torch.set_rng_state(state["torch_rng"])
        self.rng.bit_generator.state = json.loads(state["numpy_rng"])
        self.data.rng.bit_generator.state = json.loads(state["data_rng"])
        self.step = int(state["step"])
        self._seconds_from = self.step

    # -- export
    def export(self) -> Path:
        """The EMA weights as a diffusers directory (``output_dir / "model"``), safetensors only."""
        params = [p for m in self.trainable for p in m.parameters()]
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            out = self.config.output_dir / "model"
            tmp = self.config.output_dir / "model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self._pipeline().save_pretrained(tmp, safe_serialization=True)
            replace_dir(tmp, out)  # the old export stays whole until the new one is in place
            return out
        finally:
            self.ema.restore(params)

    def _pipeline(self):
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionUpscalePipeline

        if self.config.task == "vae":
            return _VaeOnly(self.vae, self._latent_scale())
        if self.config.task == "controlnet":
            return self.controlnet  # a diffusers ControlNetModel directory (config.json + safetensors)
        sched = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        parts = dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet)
        if self.config.task in ("base", "gligen"):  # a GLIGEN base: the gated UNet in an SD pipeline
            return StableDiffusionPipeline(**parts, scheduler=sched, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        scale = self.vae.config.scaling_factor
        pipe = StableDiffusionUpscalePipeline(**parts, scheduler=sched, low_res_scheduler=self.low_res_scheduler,
                                              max_noise_level=self.config.max_noise_level)
        # diffusers has just set our VAE's scaling_factor to 0.08333 (see anysize.models.restore_vae_scale):
        # put back the one the UNet was trained with, for the export and for any training after it
        self.vae.register_to_config(scaling_factor=scale)
        return pipe

    def _latent_scale(self) -> float:
        """1 / std of the latents on fresh scenes, as Stable Diffusion's ``scaling_factor``; the
        encoder's own when only the decoder was trained (the latents it scales have not changed)."""
        if self.config.decoder_only:
            return float(self.vae.config.scaling_factor)
        with torch.no_grad():
            images = to_tensor(SceneData(self.config.seed + 1).crops(self.config.resolution, 16, (1.0, 4.0)))
            images = images.to(self.device)
            return float(1.0 / self.vae.encode(images).latent_dist.mean.std())


class _VaeOnly:
    """Saves a trained VAE with its measured ``scaling_factor``."""

    def __init__(self, vae, scale: float):
        self.vae, self.scale = vae, scale

    def save_pretrained(self, directory: Path, safe_serialization: bool = True) -> None:
        self.vae.register_to_config(scaling_factor=self.scale)
        self.vae.save_pretrained(Path(directory) / "vae", safe_serialization=safe_serialization)


def train(config: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the exported diffusers directory."""
    return Trainer(config).run()
