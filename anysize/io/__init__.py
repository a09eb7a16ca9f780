"""Files: atomic writes (:mod:`.atomic`), rasters on disk and streamed pyramid TIFF / Deep Zoom output
(:mod:`.stream`), image formats with their metadata (:mod:`.output`) and the local viewer (:mod:`.view`).
Nothing here imports torch."""

from .atomic import atomic_write

__all__ = ["atomic_write"]
