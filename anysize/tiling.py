"""Public path of the tile geometry (DESIGN.md's contract: ``from anysize.tiling import fstd_tiles``);
the code lives in :mod:`anysize.core.tiling`."""

from .core.tiling import (AREA_BUDGET, METHODS, SHIFTS, WEIGHTINGS, Box, TilingConfig, coverage, fstd_tiles,  # noqa: F401
                          naive_tiles, overlap_tiles, tile_weights)
