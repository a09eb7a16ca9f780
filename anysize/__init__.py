"""anysize: text to an image of any width x height (Any-Size-Diffusion: ARAD buckets, then FSTD)."""

from .sampler import TiledModel, TileMerger, UNetTileDenoiser, sample, sample_tiled
from .tiling import TilingConfig, fstd_tiles, naive_tiles, overlap_tiles

__version__ = "0.1.0"
__all__ = [
    "TiledModel",
    "TileMerger",
    "TilingConfig",
    "UNetTileDenoiser",
    "fstd_tiles",
    "naive_tiles",
    "overlap_tiles",
    "sample",
    "sample_tiled",
]
