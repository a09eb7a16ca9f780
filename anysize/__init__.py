"""anysize: text to an image of any width x height (Any-Size-Diffusion: ARAD buckets, then FSTD).

Names load lazily, so ``import anysize`` (and ``anysize --help``) does not import torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "AnySizePipeline": "pipeline",
    "AnySizeOutput": "pipeline",
    "TiledModel": "sampler",
    "TileMerger": "sampler",
    "UNetTileDenoiser": "sampler",
    "sample": "sampler",
    "sample_tiled": "sampler",
    "TilingConfig": "tiling",
    "fstd_tiles": "tiling",
    "naive_tiles": "tiling",
    "overlap_tiles": "tiling",
    "tiled_decode": "vae",
    "tiled_encode": "vae",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'anysize' has no attribute {name!r}")
