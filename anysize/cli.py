"""The ``anysize`` command line: ``generate``, ``upscale``, ``buckets``, ``train``, ``view``, ``serve`` and ``resume``.

Every error is one line on stderr, ``anysize: error: ...``, with no traceback: exit 2 for a bad
argument, 1 when a valid request fails (model loading, memory preflight, I/O), 130 on Ctrl-C. Output
paths are checked before any compute and written atomically, so a failed run leaves no file behind.
Set ``ANYSIZE_DEBUG=1`` to see the traceback of a runtime error instead.
"""

from __future__ import annotations

import os

# Batch-invariant MKL GEMM on the CPU, so a seed gives the same image whatever the tile batch size
# (README: Determinism). It only works if set before torch loads, hence torch's lazy imports below.
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from . import __version__  # noqa: E402
from .buckets import BEYOND_BUCKETS  # noqa: E402
from .io.output import check_output_path  # noqa: E402
from .schedulers import SCHEDULERS  # noqa: E402  (no torch import)

TILING = ("fstd", "overlap", "naive", "none")  # anysize.core.tiling.METHODS, named here without importing torch
DTYPES = ("auto", "float32", "float16", "bfloat16")
SCHEDULER_NAMES = tuple(SCHEDULERS)
MIN_SIDE = 8
UPSCALER_STEPS = "the upscaler's own choice, 1 with the default model; else 20"  # AnySizePipeline.default_upscale_steps
EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
COMMAND_FILE = "command.json"  # in a --run-dir: the command line that ``anysize resume`` runs again


class UsageError(Exception):
    """A bad command line (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so ``main`` prints one line."""

    def error(self, message: str):
        raise UsageError(message)


# ---------------------------------------------------------------------- argument types
def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` (also ``W*H``, ``WXH``) with integer sides >= 8 -> (width, height)."""
    match = re.fullmatch(r"\s*([+-]?\d+)\s*[xX*]\s*([+-]?\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < MIN_SIDE:
        raise argparse.ArgumentTypeError(
            f"'{text}': must be WIDTHxHEIGHT with integers >= {MIN_SIDE}, e.g. 1024x768")
    return int(match[1]), int(match[2])


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"\s*[+-]?\d+\s*", text) or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"'{text}': must be an integer >= {minimum}")
        return int(text)

    return parse


def _float_in(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            rule = f"in ({low:g}, {high:g}]" if low_open else (
                f">= {low:g}" if math.isinf(high) else f"in [{low:g}, {high:g}]")
            raise argparse.ArgumentTypeError(f"'{text}': must be a number {rule}")
        return value

    return parse


def _port(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"'{text}': must be an integer in [0, 65535] (0: a free port)")
    return int(text)


def _bytes(text: str) -> int:
    from .memory import parse_bytes  # no torch import

    try:
        return parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': must be a byte count such as 8GiB, 512MiB, 16GB or 1000000") \
            from None


def _region(text: str) -> tuple:
    from .regions import parse  # no torch import

    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--region {text!r}: ")) from None


def _lora(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` (a finite number); a path that itself holds a colon needs the scale."""
    path, sep, scale = text.rpartition(":")
    if not sep or not path:
        return text, 1.0
    try:
        value = float(scale)
    except ValueError:
        return text, 1.0  # a colon of the path itself (C:\...)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}': the scale after ':' must be a finite number")
    return path, value


def _gligen(text: str) -> tuple[tuple[float, ...], str]:
    """``x0,y0,x1,y1:phrase``, the box in fractions of the image (as diffusers' GLIGEN takes it)."""
    box, sep, phrase = text.partition(":")
    try:
        values = tuple(float(v) for v in box.split(","))
    except ValueError:
        values = ()
    if not sep or not phrase.strip() or len(values) != 4:
        raise argparse.ArgumentTypeError(f"'{text}': must be 'x0,y0,x1,y1:phrase' (fractions of the image)")
    return values, phrase


def _embedding(text: str) -> tuple[str, str | None]:
    """``PATH`` or ``PATH:TOKEN`` (a token holds no path separator, so ``C:\\x.pt`` stays a path)."""
    path, sep, token = text.rpartition(":")
    if not sep or not path or not token or "/" in token or "\\" in token:
        return text, None
    return path, token


def _buckets_list(text: str) -> list[tuple[int, int]]:
    from .buckets import parse_buckets  # no torch import

    try:
        return parse_buckets(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bytes_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else _bytes(text)


def _seed(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) >= 2**64:
        raise argparse.ArgumentTypeError(f"'{text}': must be an integer in [0, 2**64)")
    return int(text)


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``anysize`` argument parser with its subcommands."""
    parser = _Parser(prog="anysize", description="Text to an image of any width x height (Any-Size-Diffusion).",
                     epilog="Errors print one line; set ANYSIZE_DEBUG=1 for a traceback of runtime errors.")
    parser.add_argument("--version", action="version", version=f"anysize {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate(sub)
    _add_upscale(sub)
    _add_buckets(sub)
    _add_train(sub)
    _add_view(sub)
    _add_serve(sub)
    _add_resume(sub)
    return parser


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text to an image of exactly WxH pixels",
                       description="Stage 1 samples at the aspect-ratio bucket nearest WxH; stage 2 enlarges "
                                   "it with tiled diffusion to exactly WxH.")
    p.add_argument("prompt", metavar="PROMPT")
    _add_request(p, steps=30)
    p.add_argument("--upscale-steps", type=_int_at_least(1), default=None, metavar="N",
                   help=f"stage 2 sampling steps per pass (default: {UPSCALER_STEPS})")
    p.add_argument("--guidance", type=_float_in(0, math.inf), default=7.5, metavar="X",
                   help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--upscale-guidance", type=_float_in(0, math.inf), default=None, metavar="X",
                   help="guidance of stage 2 (default: --guidance); 1 turns it off, as for upscalers "
                        "trained without captions (the default model's)")
    p.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt")
    p.add_argument("--clip-skip", type=_int_at_least(0), default=None, metavar="N",
                   help="read the prompt from the text encoder's N-th layer from the end (as A1111's and "
                        "diffusers' clip skip)")
    p.add_argument("--eta", type=_float_in(0, 1), default=None, metavar="X", help="DDIM's eta (default 0)")
    p.add_argument("--true-cfg", dest="true_cfg", type=_float_in(1, math.inf), default=1.0, metavar="X",
                   help="FLUX: true classifier-free guidance with --negative (diffusers' true_cfg_scale; default 1: "
                        "off, FLUX.1's guidance being embedded: --guidance)")
    p.add_argument("--long-prompt", choices=("cut", "chunk"), default="cut",
                   help="a prompt past the text encoder's window (77 tokens for CLIP): cut to it as diffusers "
                        "does, with a warning (default), or read whole window by window as A1111 does (chunk)")
    p.add_argument("--guidance-rescale", type=_float_in(0, 1), default=0.0, metavar="X",
                   help="rescale guided predictions towards the text-conditioned one's spread (diffusers' "
                        "guidance_rescale, against over-exposure with v-prediction models; default 0: off)")
    p.add_argument("--count", type=_int_at_least(1), default=1, metavar="N",
                   help="make N images with seeds SEED, SEED+1, ... (as A1111's batch count), written to "
                        "OUT-0001.png, OUT-0002.png, ... (default 1: OUT itself)")
    _add_panorama(p)
    _add_run_options(p)
    p.set_defaults(run=_generate)


def _add_panorama(p: argparse.ArgumentParser) -> None:
    p.add_argument("--panorama", choices=BEYOND_BUCKETS, default="auto",
                   help="a ratio beyond the buckets (wider than 2:1, taller than 1:2): stretch the nearest "
                        "bucket's image to it (keeps the composition), or sample at the ratio itself, direct or "
                        "tiled (both repeat objects on the default model unless a ControlNet sets the layout). "
                        "Default auto: direct when a ControlNet steers stage 1, else stretch")


def _add_upscale(sub) -> None:
    p = sub.add_parser("upscale", help="enlarge an image to exactly WxH pixels (stage 2 alone)")
    p.add_argument("image", metavar="IMAGE", help="input image (any format Pillow reads)")
    _add_request(p, steps=None)
    p.add_argument("--prompt", default="", metavar="TEXT", help="what the image shows (default: empty)")
    p.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt")
    p.add_argument("--guidance", type=_float_in(0, math.inf), default=1.0, metavar="X",
                   help="classifier-free guidance scale (default 1: off, as for upscalers trained without captions)")
    _add_run_options(p)
    p.set_defaults(run=_upscale)


def _add_request(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--size", type=parse_size, required=True, metavar="WxH",
                   help="output size in pixels, e.g. 3000x4500")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file: .png, .jpg, .webp, or for sizes beyond memory .tif (tiled pyramid) or .dzi "
                        "(Deep Zoom), both written tile by tile")
    p.add_argument("--seed", type=_seed, default=None, metavar="N", help="random seed (default: a random one, "
                   "printed and stored in the file)")
    p.add_argument("--steps", type=_int_at_least(1), default=steps, metavar="N",
                   help=f"sampling steps (default {steps or UPSCALER_STEPS})")
    p.add_argument("--run-dir", default=None, metavar="DIR",
                   help="checkpoint the run in DIR; after a crash or Ctrl-C, 'anysize resume DIR' continues it")
    p.add_argument("--checkpoint-every", type=_int_at_least(1), default=1, metavar="N",
                   help="with --run-dir: save a checkpoint every N sampling steps (default 1)")
    p.add_argument("--from-image", default=None, metavar="FILE",
                   help="run again the command that made FILE (an anysize output: its metadata holds the "
                        "command line, seed included); options given here replace its single-valued ones and "
                        "add to its repeatable ones, e.g. '--from-image out.png -o again.png --steps 40'")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiling", choices=TILING, default="fstd", help="tiling method (default fstd)")
    p.add_argument("--tile-size", type=_int_at_least(8), default=None, metavar="N",
                   help="tile size in latent pixels (default: the model's native size)")
    p.add_argument("--tile-batch", type=_int_at_least(1), default=None, metavar="N",
                   help="tiles per UNet call (default: the memory planner's choice)")
    p.add_argument("--vae-tile", type=_int_at_least(8), default=None, metavar="N",
                   help="VAE decode tile in latent pixels (default: the memory planner's choice, 64 when it fits)")
    p.add_argument("--max-memory", type=_bytes, default=None, metavar="SIZE",
                   help="memory budget for the planner, e.g. 8GiB or 512MiB (default: what is free on the device)")
    p.add_argument("--latent-memory", type=_bytes_or_zero, default=None, metavar="SIZE",
                   help="a pass whose sampling state needs more than this keeps it on disk and works by bands "
                        "of rows, so memory stays flat at any size (default 256MiB on the CPU, no limit on CUDA; 0: always)")
    p.add_argument("--tile-stride", type=_int_at_least(1), default=None, metavar="N",
                   help="--tiling overlap: the grid's step in latent pixels (default: half the tile)")
    p.add_argument("--tile-shift", choices=("auto", "both", "alternate"), default=None,
                   help="--tiling fstd: shift both axes every step, alternate them, or auto (default: both; with "
                        "--tile-edges clamp, both while it costs <= 1.15x the latent area)")
    p.add_argument("--tile-edges", choices=("cut", "clamp"), default=None,
                   help="--tiling fstd: a canvas edge's partial band gets a tile of its own size (cut, the default: "
                        "each pixel once, no fixed tile edge) or a full tile clamped inward (clamp: one tile size)")
    p.add_argument("--tile-last-step", choices=("blend", "single"), default=None,
                   help="--tiling fstd: the last step runs a second grid cut mid-tile of the first and blends the "
                        "two, so its cuts leave no line (blend, the default: one extra step's tiles), or one grid "
                        "(single)")
    p.add_argument("--tile-weighting", choices=("uniform", "linear", "gaussian"), default=None,
                   help="how overlapping tiles blend (default: gaussian for overlap, uniform otherwise)")
    p.add_argument("--region", type=_region, action="append", default=None, metavar="BOX:PROMPT",
                   help="a prompt for a box of the output, 'x0,y0,x1,y1:prompt' or 'x0,y0,x1,y1,weight:prompt' "
                        "(pixels, or fractions when every number is <= 1: '0,0,0.5,1:a red circle on grass' is "
                        "the left half); repeatable. Inside the box it replaces the prompt (weight 1, default) "
                        "or shares it, with feathered edges, in both stages")
    p.add_argument("--gligen", type=_gligen, action="append", default=None, metavar="BOX:PHRASE",
                   help="GLIGEN (a base with gated self-attention): a phrase grounded to a box, "
                        "'x0,y0,x1,y1:phrase' in fractions of the image; repeatable (at most 30)")
    p.add_argument("--gligen-beta", type=_float_in(0, 1), default=0.3, metavar="X",
                   help="GLIGEN's scheduled sampling: the grounding acts during this fraction of each "
                        "phase's steps (default 0.3, as diffusers)")
    control = p.add_argument_group("ControlNet")
    control.add_argument("--controlnet", action="append", default=None, metavar="PATH",
                         help="a ControlNet of the base model (diffusers directory, .safetensors file or hub id); "
                              "repeatable, each with its own --control-image")
    control.add_argument("--control-image", action="append", default=None, metavar="IMAGE",
                         help="the control image of each --controlnet, in order (any size: resized to each phase, "
                              "so give it at the output's ratio), or 'tile': each stage-2 pass's own input "
                              "(ControlNet-tile upscaling, with --img2img)")
    control.add_argument("--controlnet-scale", type=_float_in(0, math.inf), action="append", default=None,
                         metavar="X", help="conditioning scale, once for all or once per ControlNet (default 1)")
    control.add_argument("--control-start", type=_float_in(0, 1), action="append", default=None, metavar="X",
                         help="fraction of each phase's steps before a ControlNet starts acting (default 0)")
    control.add_argument("--control-end", type=_float_in(0, 1), action="append", default=None, metavar="X",
                         help="fraction of each phase's steps after which it stops (default 1)")
    p.add_argument("--color-fix", choices=("backproject", "adain", "none"), default="backproject",
                   help="backproject: make each stage-2 pass's output average down to its input (its colours and "
                        "shapes at the input's resolution); adain: match only the colour statistics (default "
                        "backproject)")
    p.add_argument("--strength", type=_float_in(0, 1, low_open=True), default=0.3, metavar="X",
                   help="img2img upscaling: how much each pass may change (default 0.3)")
    p.add_argument("--noise-level", type=_int_at_least(0), default=20, metavar="N",
                   help="x4 upscaler: the noise added to its low-resolution input (default 20; at most the "
                        "upscaler's max_noise_level)")
    models = p.add_argument_group("models")
    models.add_argument("--base", metavar="PATH", help="base model: diffusers directory, .safetensors file or hub id")
    models.add_argument("--upscaler", metavar="PATH", help="x4 upscaler model (SD x4-upscaler layout)")
    models.add_argument("--config", default=None, metavar="DIR",
                        help="with a single-file --base: a diffusers directory of its family (diffusers needs the "
                             "original config, offline from disk; an SD3 / FLUX transformer file takes its VAE and "
                             "text encoders from it)")
    models.add_argument("--variant", default=None, metavar="NAME",
                        help="the weights' variant, e.g. fp16 for a directory of *.fp16.safetensors")
    models.add_argument("--img2img", action="store_true", help="upscale img2img-style with the base model")
    models.add_argument("--no-t5", dest="without_t5", action="store_true",
                        help="an SD3 --base without its T5 text encoder (4.8B parameters): its CLIP encoders alone "
                             "read the prompt")
    models.add_argument("--lora", type=_lora, action="append", default=None, metavar="PATH[:SCALE]",
                        help="a LoRA of the base model (.safetensors, kohya/A1111 or diffusers format) and its "
                             "scale (default 1); repeatable")
    models.add_argument("--embedding", type=_embedding, action="append", default=None, metavar="PATH[:TOKEN]",
                        help="a textual-inversion embedding of the base model (.safetensors, A1111 or diffusers "
                             "format) and the token that calls it in a prompt (default: the file's name); "
                             "repeatable")
    models.add_argument("--buckets", type=_buckets_list, default=None, metavar="WxH,WxH,...",
                        help="stage 1's sizes (default: SDXL's training sizes for SDXL, else ARAD's nine ratios "
                             "at the base model's native area)")
    models.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None, metavar="NAME",
                        help="stage 1's sampler (default: the base model's own): " + ", ".join(SCHEDULER_NAMES))
    models.add_argument("--upscale-scheduler", choices=SCHEDULER_NAMES, default=None, metavar="NAME",
                        help="stage 2's sampler (default: the stage-2 model's own, or --scheduler with --img2img)")
    models.add_argument("--device", default=None, metavar="D", help="cpu, cuda, cuda:1, mps (default: best available)")
    models.add_argument("--dtype", choices=DTYPES, default="auto", help="weights' dtype (default: float16 on GPUs)")
    models.add_argument("--allow-pickle", action="store_true",
                        help="allow pickle checkpoints (.ckpt); they can run code")
    p.add_argument("--quiet", action="store_true", help="no plan line and no progress bars")


def _add_buckets(sub) -> None:
    p = sub.add_parser("buckets", help="list the aspect-ratio buckets and where a size maps (no model needed)")
    p.add_argument("--size", type=parse_size, default=None, metavar="WxH", help="a request to map to its bucket")
    p.add_argument("--area", type=_int_at_least(1), default=512 * 512, metavar="N",
                   help="native pixel area (default 262144 = 512x512; SDXL 1048576)")
    p.add_argument("--granularity", type=_int_at_least(1), default=64, metavar="N",
                   help="bucket sides are multiples of this (default 64)")
    _add_panorama(p)
    p.set_defaults(run=_buckets)


# ---------------------------------------------------------------------- commands
def _generate(args: argparse.Namespace, pipe=None) -> int:
    """``anysize generate``; ``pipe``: an already loaded pipeline for these model options (``anysize serve``
    keeps one loaded between jobs), else they are loaded here."""
    extra = {"steps": args.steps, "upscale_steps": args.upscale_steps, "guidance": args.guidance,
             "upscale_guidance": args.guidance if args.upscale_guidance is None else args.upscale_guidance}
    return _run(args, None, extra, call="generate", prompt=args.prompt, num_inference_steps=args.steps,
                upscale_inference_steps=args.upscale_steps, guidance_scale=args.guidance,
                upscale_guidance_scale=args.upscale_guidance, negative_prompt=args.negative, panorama=args.panorama,
                clip_skip=args.clip_skip, eta=args.eta, guidance_rescale=args.guidance_rescale,
                long_prompt=args.long_prompt, true_cfg_scale=args.true_cfg, pipe=pipe)


def _upscale(args: argparse.Namespace) -> int:
    source = _read_image(args.image, "IMAGE")
    extra = {"steps": args.steps, "source": str(args.image), "source_size": list(source.size)}
    return _run(args, source, extra, call="upscale", prompt=args.prompt, num_inference_steps=None,
                upscale_inference_steps=args.steps, guidance_scale=args.guidance, negative_prompt=args.negative,
                source_size=source.size)


def _run(args: argparse.Namespace, source, extra: dict, pipe=None, **request) -> int:
    """One Request from the options, planned once (the memory plan and the stage plan printed before
    anything runs: a request that cannot fit stops here with the numbers), then run once."""
    out = check_output_path(args.output, args.size)
    controls = _control_images(args)  # read before the models load: a bad file stops at once
    pipe = _load(args) if pipe is None else pipe
    if "upscale_inference_steps" in request and request["upscale_inference_steps"] is None:
        # recorded resolved, so the metadata and --from-image say the steps that ran
        request["upscale_inference_steps"] = pipe.default_upscale_steps
        extra["upscale_steps" if request["call"] == "generate" else "steps"] = pipe.default_upscale_steps
    from .request import Request
    from .stages import image_digest

    if source is not None:
        request["source_digest"] = image_digest(source)
    seed = _pick_seed(args)
    request = Request(width=args.size[0], height=args.size[1], strength=args.strength,
                      noise_level=args.noise_level, tiling=_tiling(args),
                      tile_size=args.tile_size, tile_batch_size=args.tile_batch, vae_tile_size=args.vae_tile,
                      max_memory=args.max_memory, latent_memory=args.latent_memory, color_fix=args.color_fix,
                      regions=tuple(args.region or ()), **_control_kwargs(args, controls), **_gligen_kwargs(args),
                      **_file_kwargs(args, pipe, seed, out, extra), **request)
    plan = pipe.plan_run(request)
    _say(args, plan.memory.describe())
    count = getattr(args, "count", 1)
    seeds = f"seeds {seed}..{seed + count - 1}" if count > 1 else f"seed {seed}"
    _say(args, f"{plan.describe()}; {seeds}")
    if args.run_dir is not None:
        if count > 1:
            raise UsageError("--run-dir: holds one image; pass --count 1 (the default)")
        plan = dataclasses.replace(plan, request=dataclasses.replace(plan.request, **_run_kwargs(args, seed)))
    code = 0
    for k in range(count):  # image k: seed + k, as A1111 numbers a batch, its own file and metadata
        this = plan if count == 1 else _numbered_plan(plan, out, k, seed)
        code = _done(pipe.run(this, image=source, generator=_generator(seed + k), control_image=controls))
    return code


def _numbered_plan(plan, out: Path, k: int, seed: int):
    """Image ``k`` of a ``--count`` batch: ``OUT-0001.png``... with its own seed in its metadata, and a
    command line that makes it alone (``--seed`` and ``--count 1`` after the stored options)."""
    req = plan.request
    if req.output_path is None:  # under torchrun, ranks other than 0 keep latents
        return plan
    meta = dict(req.output_metadata or {})
    meta.update(seed=seed + k, argv=[*meta.get("argv", []), "--seed", str(seed + k), "--count", "1"])
    path = out.with_name(f"{out.stem}-{k + 1:04d}{out.suffix}")
    return dataclasses.replace(plan, request=dataclasses.replace(req, output_path=path, output_metadata=meta))


def _gligen_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--gligen`` boxes and phrases as Request fields (none: none)."""
    pairs = getattr(args, "gligen", None) or []
    return {"gligen_phrases": tuple(p for _, p in pairs), "gligen_boxes": tuple(b for b, _ in pairs),
            "gligen_scheduled_sampling_beta": getattr(args, "gligen_beta", 0.3)}


def _control_images(args: argparse.Namespace) -> tuple:
    """The ``--control-image`` files read (or 'tile'), one per ``--controlnet``."""
    from .request import TILE

    given, nets = args.control_image or [], args.controlnet or []
    if len(given) != len(nets):
        raise UsageError(f"--control-image: {len(given)} given for {len(nets)} --controlnet; pass one per "
                         f"ControlNet, in order (a file, or '{TILE}')")
    return tuple(TILE if path == TILE else _read_image(path, "--control-image") for path in given)


def _control_kwargs(args: argparse.Namespace, controls: tuple) -> dict[str, Any]:
    """The Request's ControlNet fields: the images' digests, and each setting once for all or one per ControlNet."""
    if not controls:
        for flag in ("controlnet_scale", "control_start", "control_end"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')}: sets a ControlNet; pass --controlnet and --control-image")
        return {}
    from .pipeline import _digests

    out: dict[str, Any] = {"control_images": _digests(controls)}
    for flag, name in (("controlnet_scale", "controlnet_conditioning_scale"), ("control_start", "control_guidance_start"),
                       ("control_end", "control_guidance_end")):
        values = getattr(args, flag)
        if values is not None:
            out[name] = values[0] if len(values) == 1 else tuple(values)
    return out


def _tiling(args: argparse.Namespace):
    """``--tiling`` alone as its name; with ``--tile-stride``, ``--tile-shift``, ``--tile-edges``,
    ``--tile-last-step`` or ``--tile-weighting`` a TilingConfig."""
    if all(v is None for v in (args.tile_stride, args.tile_shift, args.tile_edges, args.tile_last_step,
                               args.tile_weighting)):
        return args.tiling
    from .core.tiling import TilingConfig

    if args.tile_stride is not None and args.tiling != "overlap":
        raise UsageError(f"--tile-stride: sets the overlap grid's step; it needs --tiling overlap, not {args.tiling}")
    if args.tile_shift is not None and args.tiling != "fstd":
        raise UsageError(f"--tile-shift: sets how FSTD shifts its grid; it needs --tiling fstd, not {args.tiling}")
    if args.tile_edges is not None and args.tiling != "fstd":
        raise UsageError(f"--tile-edges: sets FSTD's edge tiles; it needs --tiling fstd, not {args.tiling}")
    if args.tile_last_step is not None and args.tiling != "fstd":
        raise UsageError(f"--tile-last-step: sets FSTD's last step; it needs --tiling fstd, not {args.tiling}")
    return TilingConfig(method=args.tiling, stride=args.tile_stride, shift=args.tile_shift or "auto",
                        edges=args.tile_edges or "cut", last_step=args.tile_last_step or "blend",
                        weighting=args.tile_weighting)


def _buckets(args: argparse.Namespace) -> int:
    from .buckets import arad_buckets, choose_base_size, stretch_factor, stretch_note

    buckets = arad_buckets(args.area, args.granularity)
    choice = (choose_base_size(*args.size, buckets, granularity=args.granularity, beyond=args.panorama)
              if args.size else None)
    print(f"ARAD buckets at {args.area} px, sides multiples of {args.granularity} (W x H, ratio H/W):")
    for w, h in buckets:
        mark = "*" if choice is not None and not choice.panorama and choice.size == (w, h) else " "
        print(f" {mark} {w:>5} x {h:<5} {h / w:.3f}")
    if choice is not None:
        w, h = args.size
        where = (f"panorama {choice.width}x{choice.height} (ratio outside the buckets: stage 1 samples "
                 f"{'tiled' if choice.tiled else 'untiled'} at it)" if choice.panorama
                 else f"bucket {choice.width}x{choice.height}{stretch_note(stretch_factor(choice.size, w, h))}")
        print(f"{w}x{h} (ratio {h / w:.3f}) -> {where}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a VAE, a base model, an x4 upscaler or a ControlNet; fine-tune on your images",
                       description="Aspect-ratio bucketed training (ARAD): every batch from one bucket. "
                                   "Run again with the same -o to resume from the last checkpoint.")
    p.add_argument("task", choices=("vae", "base", "upscaler", "controlnet", "gligen"),
                   help="what to train (controlnet: of the --init base model, on the scenes' object silhouettes; "
                        "gligen: gated layers added to the --init base, on the scenes' phrases and boxes)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="run directory (checkpoints, model/)")
    p.add_argument("--data", default="scenes", metavar="SRC",
                   help="'scenes' (the procedural domain) or a folder of images with .txt captions")
    p.add_argument("--buckets", choices=("arad", "square"), default="arad",
                   help="ARAD ratio buckets, or square only (the composition baseline)")
    p.add_argument("--init", default=None, metavar="DIR", help="diffusers model directory to fine-tune")
    p.add_argument("--vae", default=None, metavar="DIR", help="trained VAE (run directory's model/ of a vae run)")
    p.add_argument("--decoder-only", action="store_true",
                   help="vae with --init: train the decoder only; the encoder and its latents stay as they are, "
                        "so models trained on them keep working")
    p.add_argument("--resolution", type=_int_at_least(8), default=None, metavar="PX",
                   help="native side: buckets hold about PX^2 pixels (default: the --init model's, else 64)")
    p.add_argument("--crop", type=_int_at_least(16), default=128, metavar="PX", help="upscaler crop side (default 128)")
    p.add_argument("--steps", type=_int_at_least(1), default=2000, metavar="N")
    p.add_argument("--batch-size", type=_int_at_least(1), default=32, metavar="N")
    p.add_argument("--lr", type=_float_in(0, 1, low_open=True), default=3e-4, metavar="X")
    p.add_argument("--checkpoint-every", type=_int_at_least(1), default=250, metavar="N")
    p.add_argument("--seed", type=_seed, default=0, metavar="N")
    p.add_argument("--workers", type=_int_at_least(0), default=0, metavar="N",
                   help="processes rendering the procedural scenes (default 0: in the training process; "
                        "a GPU run needs a few to keep the model busy)")
    p.add_argument("--max-minutes", type=_float_in(0, 1e6, low_open=True), default=None, metavar="M",
                   help="stop after M minutes of training (checkpoint and export); run again to continue")
    p.add_argument("--final-t-fraction", type=_float_in(0, 1), default=0.0, metavar="F",
                   help="base / upscaler: fraction of each batch trained at the last timestep, where a "
                        "one-step sampler evaluates the model (default 0: uniform timesteps)")
    p.add_argument("--min-t-fraction", type=_float_in(0, 0.999), default=0.0, metavar="F",
                   help="train at timesteps t >= F * T only (default 0: all; gligen: its gates act at the noisiest)")
    p.add_argument("--box-weight", type=_float_in(0, 1e6), default=0.0, metavar="W",
                   help="gligen: the loss inside the objects' boxes weighs 1 + W times the rest (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    config = TrainConfig(
        task=args.task, output_dir=Path(args.output), init=args.init and Path(args.init),
        vae=args.vae and Path(args.vae), data=args.data, buckets=args.buckets, resolution=args.resolution,
        crop=args.crop, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        checkpoint_every=args.checkpoint_every, seed=args.seed, workers=args.workers,
        max_minutes=args.max_minutes, progress=not args.quiet, decoder_only=args.decoder_only,
        final_t_fraction=args.final_t_fraction, box_weight=args.box_weight,
        min_t_fraction=args.min_t_fraction,
    )
    print(train(config))
    return 0


def _add_resume(sub) -> None:
    p = sub.add_parser("resume", help="continue a run started with --run-dir after a crash or Ctrl-C",
                       description="Runs the command stored in DIR again, from the working directory it was "
                                   "started in; finished phases are skipped and the current one continues from "
                                   "its last checkpoint (bit-identical to an uninterrupted run on the CPU).")
    p.add_argument("run_dir", metavar="DIR", help="the --run-dir of the interrupted run")
    p.add_argument("--quiet", action="store_true", help="no plan line and no progress bars")
    p.set_defaults(run=_resume)


def _resume(args: argparse.Namespace) -> int:
    import json

    file = Path(args.run_dir) / COMMAND_FILE
    if not file.is_file():
        raise ValueError(f"DIR '{args.run_dir}': not a run directory (no {COMMAND_FILE}); "
                         "start a run with --run-dir DIR")
    try:
        stored = json.loads(file.read_text())
        argv, cwd = [str(a) for a in stored["argv"]], str(stored["cwd"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"DIR '{args.run_dir}': {COMMAND_FILE} is damaged") from None
    if stored.get("version") != __version__:
        _say(args, f"note: the run was started by anysize {stored.get('version')}, this is {__version__}")
    os.chdir(cwd)
    return main([*argv, *(["--quiet"] if args.quiet and "--quiet" not in argv else [])])


def _run_kwargs(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """``run_dir`` and ``checkpoint_every`` for the pipeline, after storing the command for ``resume``."""
    if args.run_dir is None:
        return {}
    from .core import distributed

    if distributed.current() is not None:
        raise UsageError("--run-dir: not supported under torchrun yet; run it in one process")
    _remember_command(args, seed)
    return {"run_dir": args.run_dir, "checkpoint_every": args.checkpoint_every}


def _remember_command(args: argparse.Namespace, seed: int) -> None:
    """Store the command line (with the seed made explicit) and its working directory in the run
    directory, for ``anysize resume``."""
    import json

    from .io.atomic import atomic_write

    argv = _replayable_argv(args, seed)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"argv": argv, "cwd": os.getcwd(), "version": __version__}, indent=1).encode()
    atomic_write(run_dir / COMMAND_FILE, lambda f: f.write(data))


def _replayable_argv(args: argparse.Namespace, seed: int) -> list[str]:
    """The command line with the seed made explicit and every argument that names an existing file or
    directory made absolute, so ``--from-image`` replays it from any directory."""
    out = []
    for token in args.argv:
        flag, eq, value = token.partition("=")
        if token == "--quiet":
            continue
        if eq and flag.startswith("--") and Path(value).exists():
            out.append(f"{flag}={Path(value).resolve()}")
        elif not token.startswith("-") and Path(token).exists() and token != args.command:
            out.append(str(Path(token).resolve()))
        else:
            out.append(token)
    return out + (["--seed", str(seed)] if args.seed is None else [])


def _from_image(argv: list[str]) -> list[str]:
    """``argv`` with ``--from-image FILE`` replaced by the command line stored in FILE's metadata
    (then the rest of ``argv``, whose options come later and so take precedence)."""
    if "--from-image" not in argv and not any(a.startswith("--from-image=") for a in argv):
        return argv
    rest, source = [], None
    tokens = iter(argv)
    for token in tokens:
        if token == "--from-image":
            source = next(tokens, None)
        elif token.startswith("--from-image="):
            source = token.partition("=")[2]
        else:
            rest.append(token)
    if not source:
        raise UsageError("--from-image: expected a file")
    from .io.output import read_metadata

    try:
        stored = read_metadata(source).get("argv")
    except (OSError, ValueError) as exc:
        raise UsageError(f"--from-image '{source}': cannot be read ({_one_line(str(exc))})") from None
    if not (isinstance(stored, list) and stored and all(isinstance(a, str) for a in stored)):
        raise UsageError(f"--from-image '{source}': holds no anysize command line (not made by the anysize CLI)")
    if rest and rest[0] != stored[0]:
        raise UsageError(f"--from-image '{source}': was made by 'anysize {stored[0]}', not '{rest[0]}'")
    return stored + rest[1:]


def _add_view(sub) -> None:
    p = sub.add_parser("view", help="pan and zoom a result in the browser (a local server)",
                       description="Serve OUT as a Deep Zoom image with OpenSeadragon (shipped with anysize, no "
                                   "network needed) until Ctrl-C; prints the page's URL.")
    p.add_argument("out", metavar="OUT", help="a .dzi, a pyramid .tif, or a .png, .jpg or .webp that fits in memory")
    p.add_argument("--port", type=_port, default=0, metavar="N", help="port to listen on (default 0: a free one)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    browser = p.add_mutually_exclusive_group()
    browser.add_argument("--open", dest="open_browser", action="store_true",
                         help="open the page in the default browser")
    browser.add_argument("--no-browser", dest="open_browser", action="store_false",
                         help="only print the URL (the default)")
    p.set_defaults(run=_view)


def _view(args: argparse.Namespace) -> int:
    from .io.view import serve

    return serve(args.out, host=args.host, port=args.port, open_browser=args.open_browser)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="a local web page to generate, watch and view images (and a JSON API)",
                       description="A form for prompt, size, seed, steps, model and tiling; jobs queued and run one "
                                   "at a time, with live progress per stage and tile; results in the pan-and-zoom "
                                   "viewer and listed with their metadata. Ctrl-C stops. docs/serve.md has the API.")
    p.add_argument("--out-dir", default="anysize-images", metavar="DIR",
                   help="where the images go, NUMBER-SEED.png, listed again at the next start "
                        "(default ./anysize-images)")
    p.add_argument("--port", type=_port, default=7860, metavar="N",
                   help="port to listen on (default 7860; 0: a free one)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1: this machine only; anyone who reaches the "
                        "port can run jobs)")
    p.add_argument("--base", action="append", default=None, metavar="PATH",
                   help="a base model the form offers besides the embedded default one (diffusers directory, "
                        ".safetensors file or hub id); repeatable")
    p.add_argument("--upscaler", default=None, metavar="PATH", help="the x4 upscaler of every --base")
    p.add_argument("--img2img", action="store_true", help="every --base upscales img2img-style itself")
    p.add_argument("--device", default=None, metavar="D", help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights' dtype (default: float16 on GPUs)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle checkpoints (.ckpt); they can run code")
    p.add_argument("--open", dest="open_browser", action="store_true", help="open the page in the default browser")
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve

    _check_device(args.device)
    if args.upscaler and not args.base:
        raise UsageError("--upscaler: the upscaler of every --base; pass --base PATH too")
    if args.img2img and args.upscaler:
        raise UsageError("--img2img and --upscaler: pass one (img2img upscales with the base model instead)")
    common = [*(["--device", args.device] if args.device else []), "--dtype", args.dtype,
              *(["--allow-pickle"] if args.allow_pickle else [])]
    models: dict[str, list[str]] = {"default": common}
    for base in args.base or ():
        path = Path(base)
        name = path.stem if path.exists() else base
        while name in models:
            name += "+"
        stage2 = ["--upscaler", str(Path(args.upscaler).resolve())] if args.upscaler else []
        models[name] = ["--base", str(path.resolve()) if path.exists() else base, *stage2,
                        *(["--img2img"] if args.img2img else []), *common]
    return serve(commands(), args.out_dir, models, host=args.host, port=args.port, open_browser=args.open_browser)


def commands():
    """The command line as ``anysize serve`` uses it (:class:`anysize.serve.Commands`): each job is an
    ``anysize generate`` command line, parsed and run as here, on a pipeline the server keeps loaded."""
    from .serve import Commands

    def parse(argv: list[str]) -> argparse.Namespace:
        args, unknown = build_parser().parse_known_args(["generate", *argv])
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
        args.argv = ["generate", *argv]
        return args

    return Commands(parse=parse, load=_load, generate=lambda args, pipe: _generate(args, pipe=pipe),
                    message=_message, usage_error=UsageError, schedulers=SCHEDULER_NAMES, tilings=TILING)


# ---------------------------------------------------------------------- helpers
def _load(args: argparse.Namespace):
    """Check the model options, then load the pipeline (torch and diffusers are imported here)."""
    if args.img2img and args.upscaler:
        raise UsageError("--img2img and --upscaler: pass one (img2img upscales with the base model instead)")
    if args.img2img and not args.base:
        raise UsageError("--img2img: upscales with the base model, so it needs --base PATH")
    if args.upscaler and not args.base and args.command == "generate":
        raise UsageError("--upscaler: generate needs --base PATH too (stage 1's model)")
    _check_device(args.device)
    _quiet_libraries()
    from .pipeline import AnySizePipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the libraries' deprecation notices
        pipe = AnySizePipeline.from_pretrained(args.base, args.upscaler, device=args.device, dtype=args.dtype,
                                               allow_pickle=args.allow_pickle, img2img=args.img2img,
                                               controlnet=args.controlnet, scheduler=args.scheduler,
                                               upscale_scheduler=args.upscale_scheduler, buckets=args.buckets,
                                               config=args.config, variant=args.variant,
                                               without_t5=args.without_t5)
        if args.lora:
            pipe.load_loras(args.lora, allow_pickle=args.allow_pickle)
        if args.embedding:
            pipe.load_textual_inversion(args.embedding, allow_pickle=args.allow_pickle)
    pipe.set_progress_bar_config(disable=args.quiet)
    return pipe


def _quiet_libraries() -> None:
    """diffusers' and transformers' info logs and loading bars are noise on a command line."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def _check_device(device: str | None) -> None:
    """A one-line usage error for a device torch does not know or this machine lacks."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UsageError(f"--device '{device}': not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    mps = getattr(torch.backends, "mps", None)
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": mps is not None and mps.is_available()}
    if not available.get(kind, True):
        raise UsageError(f"--device '{device}': {kind} is not available on this machine")


def _read_image(path: str, name: str):
    """The input image as RGB; a one-line ValueError (naming the option ``name``) when it cannot be read."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{name} '{path}': not an image file Pillow can read") from None
    except FileNotFoundError:
        raise ValueError(f"{name} '{path}': no such file") from None
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
        raise ValueError(f"{name} '{path}': cannot be read ({_one_line(str(exc))})") from None


def _pick_seed(args: argparse.Namespace) -> int:
    return args.seed if args.seed is not None else secrets.randbelow(2**32)


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)  # on the CPU, so a seed gives the same noise on any device


def _file_kwargs(args: argparse.Namespace, pipe, seed: int, out: Path, extra: dict) -> dict[str, Any]:
    """The pipeline writes the file itself (decoding tile by tile into it); its metadata: the pipeline's
    info, then the settings and the version."""
    metadata = {"command": args.command, "seed": seed, **extra, "tile_size": args.tile_size,
                "device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch."), "version": __version__,
                "argv": _replayable_argv(args, seed)}
    if pipe.upscaler is None:
        metadata["strength"] = args.strength
    from .core import distributed

    if not distributed.is_main():  # under torchrun rank 0 alone decodes and writes; the others stop at latents
        return {"output_type": "latent"}
    return {"output_path": out, "output_metadata": metadata}


def _done(result) -> int:
    """Print the written path."""
    for path in result.files:
        print(path)
    return 0


def _say(args: argparse.Namespace, line: str) -> None:
    if not args.quiet:
        print(line, file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] + (" ..." if len(lines) > 1 else "") if lines else ""


def _attach_size_values(argv: list[str]) -> list[str]:
    """``--size -3x4`` -> ``--size=-3x4``, so argparse reports the value rather than a missing argument."""
    out: list[str] = []
    for token in argv:
        if out and out[-1] == "--size" and re.match(r"-\d", token):
            out[-1] = f"--size={token}"
        else:
            out.append(token)
    return out


def _error(message: str, code: int) -> int:
    print(f"anysize: error: {_one_line(message)}", file=sys.stderr, flush=True)
    return code


def _loaded(module: str, name: str) -> tuple[type, ...]:
    """``(module.name,)`` if that module is already imported, else ``()`` (never imports torch)."""
    mod = sys.modules.get(module)
    return (getattr(mod, name),) if mod is not None else ()


def _exit_code(exc: Exception) -> int:
    """1 for a valid request that failed (memory preflight included), 2 for any other bad value."""
    if isinstance(exc, _loaded("anysize.memory", "MemoryPreflightError")):
        return EXIT_RUNTIME
    return EXIT_USAGE if isinstance(exc, (UsageError, ValueError)) else EXIT_RUNTIME


def _message(exc: Exception) -> str:
    """The message alone for the errors anysize raises on purpose; otherwise with the type's name."""
    plain = (UsageError, ValueError, OSError, *_loaded("anysize.models", "ModelLoadError"))
    text = _one_line(str(exc))
    return text if isinstance(exc, plain) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


def _join_process_group(args: argparse.Namespace) -> bool:
    """Under ``torchrun --nproc_per_node N`` (WORLD_SIZE > 1), generate and upscale split each step's
    tiles across the processes (:mod:`anysize.core.distributed`): join the group, use cuda:LOCAL_RANK on
    GPUs, take rank 0's seed, and keep the other ranks quiet. False (torch not imported) otherwise."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1") or args.command not in ("generate", "upscale"):
        return False
    _check_device(args.device)
    from .core import distributed

    group = distributed.init(args.device)
    args.device = str(group.device)
    args.seed = distributed.broadcast_object(_pick_seed(args))
    args.quiet = args.quiet or not group.is_main
    return True


_PYTHON_SHOWWARNING = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """anysize's own warnings (a prompt a model cannot read, metadata left out of a JPEG) as one line;
    the libraries' as Python prints them."""
    if "anysize" in str(filename).replace("\\", "/").split("/") or category.__name__ == "PromptWarning":
        print(f"anysize: warning: {message}", file=sys.stderr if file is None else file)
        return
    _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 1 runtime error, 2 bad argument, 130 interrupted)."""
    args_list = _attach_size_values(list(sys.argv[1:] if argv is None else argv))
    args, joined = None, False
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        args_list = _from_image(args_list)
        args, unknown = build_parser().parse_known_args(args_list)
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
        args.argv = args_list
        joined = _join_process_group(args)
        return args.run(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt as exc:
        if getattr(args, "run_dir", None) and args.command in ("generate", "upscale"):
            return _error(f"interrupted{f' ({exc})' if str(exc) else ''}; continue with: anysize resume "
                          f"{args.run_dir}", EXIT_INTERRUPTED)
        return _error("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:
        if os.environ.get("ANYSIZE_DEBUG") and not isinstance(exc, UsageError):
            raise
        return _error(_message(exc), _exit_code(exc))
    finally:
        warnings.showwarning = shown
        if joined:
            from .core import distributed

            distributed.destroy()


if __name__ == "__main__":
    sys.exit(main())
