"""anysize: text to an image of any width x height (Any-Size-Diffusion: ARAD buckets, then FSTD).

Names load lazily, so ``import anysize`` (and ``anysize --help``) does not import torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "AnySizePipeline": "pipeline",
    "AnySizeOutput": "pipeline",
    "Request": "request",
    "RunPlan": "plan",
    "Phase": "plan",
    "TiledModel": "core.sampler",
    "TileMerger": "core.sampler",
    "UNetTileDenoiser": "core.sampler",
    "sample": "core.sampler",
    "sample_tiled": "core.sampler",
    "TilingConfig": "core.tiling",
    "fstd_tiles": "core.tiling",
    "naive_tiles": "core.tiling",
    "overlap_tiles": "core.tiling",
    "tiled_decode": "core.vae",
    "tiled_encode": "core.vae",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'anysize' has no attribute {name!r}")
