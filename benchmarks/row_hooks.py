"""What the batch-invariant linears cost: the default base UNet's per-sample linears computed plainly
against one distinct row at a time (``anysize.core.sampler.batch_invariant_linears``), beside one whole
guided UNet call of 16 tiles (CPU, float32).

    .venv/bin/python benchmarks/row_hooks.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import torch  # noqa: E402

from anysize import AnySizePipeline  # noqa: E402
from anysize.core.sampler import UNetTileDenoiser, _per_sample_linears, _row_by_row, batch_invariant_linears  # noqa: E402


def per_call_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def hooks_on_and_off(linears) -> None:
    with batch_invariant_linears(linears):
        pass


def main() -> None:
    pipe = AnySizePipeline.from_pretrained(device="cpu")
    unet = pipe.base.unet
    linears = _per_sample_linears(unet)
    rows = [torch.randn(1, m.in_features).expand(32, -1).contiguous() for m in linears]  # 16 tiles x CFG
    embeds = torch.randn(1, 8, unet.config.cross_attention_dim)
    den = UNetTileDenoiser(unet, embeds, negative_prompt_embeds=embeds, guidance_scale=5.0)
    x, boxes = torch.randn(16, 4, 32, 32), [(0, 0, 32, 32)] * 16
    with torch.no_grad():
        plain = per_call_ms(lambda: [m(r) for m, r in zip(linears, rows)], 100)
        hooked = per_call_ms(lambda: [_row_by_row(m, (r,), None) for m, r in zip(linears, rows)], 100)
        register = per_call_ms(lambda: hooks_on_and_off(linears), 100)
        call = per_call_ms(lambda: den(x, torch.tensor(500), boxes), 5)
    print(f"{len(linears)} per-sample linears, per UNet call: {plain:.2f} ms plain, {hooked:.2f} ms row by row, "
          f"{register:.3f} ms to add and remove the hooks; one guided UNet call of 16 tiles: {call:.0f} ms")


if __name__ == "__main__":
    main()
