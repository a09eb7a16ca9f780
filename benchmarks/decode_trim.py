"""One fast tiled VAE decode's resident memory, with glibc's freed blocks handed back every N tiles or not.

The decode's resident memory, measured alone in a fresh process, varies from run to run around and
above the planner's estimate (``anysize.memory.tiled_decode_bytes``): glibc keeps freed blocks of the
tiles' activations. ``trimN`` calls ``malloc_trim(0)`` after every N-th decoder call (``trim`` = every
call); ``none`` leaves the allocator alone. Default model's VAE in float32, random latents, pixels into
a memory-mapped file released tile by tile (as ``vae_tile.py``). One JSON line per run; run the modes
interleaved, e.g.:

    for i in 1 2 3; do for m in none trim trim4; do .venv/bin/python benchmarks/decode_trim.py 512 $m; done; done
"""

import ctypes
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from memory import ReleasingMemmapWriter  # noqa: E402
from memory_planner import Meter  # noqa: E402

from anysize import memory  # noqa: E402
from anysize.core.vae import tiled_decode, vae_scale_factor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    side, mode = int(sys.argv[1]), sys.argv[2]  # latent side; none | trim | trimN
    vae = AutoencoderKL.from_pretrained(os.path.join(ROOT, "anysize/default_model/upscaler/vae"),
                                        torch_dtype=torch.float32).eval()
    if mode.startswith("trim"):
        every, calls = int(mode[4:] or 1), [0]
        forward, trim = vae.decoder.forward, ctypes.CDLL(None).malloc_trim

        def trimming_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            calls[0] += 1
            if calls[0] % every == 0:
                trim(0)
            return out

        vae.decoder.forward = trimming_forward
    lat = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    kwargs = memory.decode_kwargs(vae, side, side, 64)
    px = side * vae_scale_factor(vae)
    meter = Meter(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        writer = ReleasingMemmapWriter(os.path.join(d, "o.npy"), (px, px, 3))
        start = time.perf_counter()
        tiled_decode(vae, lat, mode="fast", out=writer, **kwargs)
        seconds = time.perf_counter() - start
    print(json.dumps({"side": side, "mode": mode, "s": round(seconds, 1), "adds": meter.mark() >> 20,
                      "est": memory.tiled_decode_bytes(vae, side, side, 64) >> 20}))


if __name__ == "__main__":
    main()
