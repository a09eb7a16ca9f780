"""Writing images: PNG, JPEG, WebP (Pillow), pyramid TIFF (tifffile) and Deep Zoom, atomically, with metadata.

An image is a PIL image, a uint8 array, or a :class:`anysize.io.stream.Raster` (a decode streamed to a
scratch file, for images larger than memory): TIFF and Deep Zoom (``.dzi``) are written from it one
band of rows at a time; PNG, JPEG and WebP need the whole image in memory and so suit sizes that fit.

Metadata is one JSON object (whatever dict the caller passes; the CLI passes the prompt, seed, sizes,
steps, tiling, model ids and the anysize version): a PNG ``tEXt`` chunk keyed ``anysize`` (beside
A1111's ``parameters`` text when the caller gives it), the TIFF
``ImageDescription``, for JPEG and WebP the EXIF ``UserComment``, for Deep Zoom ``NAME_files/anysize.json``. JPEG keeps EXIF in one APP1
segment of at most 64 KiB, so metadata longer than that (a very long prompt) is left out of a JPEG,
with a warning, rather than failing the save.

A save never leaves a partial file: it writes a temporary file in the target's directory, fsyncs it,
then ``os.replace``-s it onto the target; on any error (or Ctrl-C) the temporary file is removed and
an existing file at the target is left as it was.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import PIL.Image
from PIL import ExifTags, PngImagePlugin

from . import stream
from .atomic import atomic_write

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff",
           ".dzi": "dzi"}
STREAMING = ("tiff", "dzi")  # formats written band by band, never holding the whole image
MAX_SIDE = {"jpeg": 65500, "webp": 16383}  # what the encoders accept per side
METADATA_KEY = "anysize"
PARAMETERS_KEY = "parameters"  # A1111's settings text
_JPEG_EXIF_LIMIT = 65000  # one APP1 segment holds 65533 bytes, with the EXIF header and IFDs
_EXIF_ASCII = b"ASCII\0\0\0"  # UserComment's character-code prefix
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

ImageLike = Union[PIL.Image.Image, np.ndarray, stream.Rows]
Size = tuple[int, int]


def output_format(path: str | os.PathLike) -> str:
    """The format a path's extension names: "png", "jpeg", "webp" or "tiff"; ValueError otherwise."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"output path '{path}': unknown format; use .png, .jpg, .webp, .tif or .dzi")
    return fmt


def check_output_path(path: str | os.PathLike, size: Size | None = None) -> Path:
    """Check, before any compute, that ``path`` can be written: known extension, an existing writable
    directory, not itself a directory, and (given ``size`` = (width, height)) within the format's limits."""
    target = Path(path)
    fmt = output_format(target)
    if target.is_dir():
        raise ValueError(f"output path '{target}': is a directory; give a file name such as '{target / 'image.png'}'")
    parent = target.parent
    if not parent.is_dir():
        raise ValueError(f"output path '{target}': directory '{parent}' does not exist")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise ValueError(f"output path '{target}': directory '{parent}' is not writable ({exc.strerror})") from None
    limit = MAX_SIDE.get(fmt)
    if size is not None and limit is not None and max(size) > limit:
        raise ValueError(f"output path '{target}': {size[0]}x{size[1]} is larger than {target.suffix} allows "
                         f"({limit} px a side); use .png or .tif")
    return target


def save_image(image: ImageLike, path: str | os.PathLike, metadata: dict | None = None,
               parameters: str | None = None) -> Path:
    """Write ``image`` (PIL, a uint8 HW / HWC array, or a :class:`anysize.io.stream.Raster`) to ``path``
    atomically, in the format of its extension, with ``metadata`` embedded as JSON; returns the path.
    ``.tif``: tiled, with a pyramid of reduced levels; ``.dzi``: Deep Zoom tiles beside it.
    ``parameters``: A1111's settings text (:mod:`anysize.infotext`), written in a PNG as the
    ``parameters`` chunk A1111's PNG Info reads (other formats: the JSON only)."""
    target = check_output_path(path, _size(image))
    fmt = output_format(target)
    text = json.dumps(metadata or {}, ensure_ascii=True, default=str)
    if fmt in STREAMING:
        source = image if isinstance(image, (stream.Raster, stream.ArrayRows)) else _as_array(image)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.stem}.levels.") as scratch:
            if fmt == "dzi":
                stream.write_dzi(target, source, text, scratch=Path(scratch))
            else:
                # BigTIFF above Pillow's pixel limit too: such files are for tiled readers anyway
                w, h = _size(image)
                limit = PIL.Image.MAX_IMAGE_PIXELS
                big = w * h * 3 > 2 * stream.GIB or (limit is not None and w * h > limit)
                atomic_write(target, lambda f: stream.write_pyramid_tiff(f, source, text, scratch=Path(scratch),
                                                                          bigtiff=big))
    else:
        if isinstance(image, (stream.Raster, stream.ArrayRows)):
            image = image.read(0, image.height)
        atomic_write(target, lambda f: _write_pillow(f, _as_pil(image, fmt), fmt, text, parameters))
    return target


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``anysize`` JSON metadata of a PNG, TIFF, JPEG or WebP file; ``{}`` when it has none."""
    fmt = output_format(path)
    if fmt == "png":
        text = _png_text(Path(path), METADATA_KEY)
    elif fmt == "dzi":
        sidecar = stream.dzi_files_dir(path) / "anysize.json"
        text = sidecar.read_text() if sidecar.is_file() else None
    elif fmt == "tiff":
        text = _tiff_description(Path(path))
    else:
        text = _exif_comment(Path(path))
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------- pixels
def _size(image: ImageLike) -> Size:
    if isinstance(image, PIL.Image.Image):
        return image.size
    if isinstance(image, (stream.Raster, stream.ArrayRows)):
        return image.width, image.height
    if isinstance(image, np.ndarray):
        _check_array(image)
        return image.shape[1], image.shape[0]
    raise ValueError(f"image of type {type(image).__name__}: must be a PIL image or a uint8 numpy array")


def _check_array(array: np.ndarray) -> None:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"image array {array.dtype}{list(array.shape)}: must be uint8 of shape (H, W) or (H, W, 1|3|4)")


def _as_array(image: ImageLike) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3|4); arrays pass through without a copy."""
    if isinstance(image, np.ndarray):
        return image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return np.asarray(image)


def _as_pil(image: ImageLike, fmt: str) -> PIL.Image.Image:
    """A PIL image in a mode ``fmt`` can store (JPEG drops alpha)."""
    pil = PIL.Image.fromarray(_as_array(image)) if isinstance(image, np.ndarray) else image
    if fmt == "jpeg" and pil.mode not in ("L", "RGB"):
        return pil.convert("RGB")
    if pil.mode not in ("L", "RGB", "RGBA"):
        return pil.convert("RGBA" if "A" in pil.getbands() else "RGB")
    return pil


# ---------------------------------------------------------------------- writers
def _write_pillow(f: BinaryIO, image: PIL.Image.Image, fmt: str, text: str, parameters: str | None = None) -> None:
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text(PARAMETERS_KEY, parameters)  # tEXt, or iTXt (UTF-8) for text beyond Latin-1
        info.add_text(METADATA_KEY, text)
        image.save(f, format="PNG", pnginfo=info, compress_level=6)
        return
    options = {"quality": 95}
    if fmt == "jpeg" and len(text) > _JPEG_EXIF_LIMIT:
        warnings.warn(f"metadata of {len(text)} bytes does not fit a JPEG's EXIF segment; saved without it",
                      stacklevel=3)
    else:
        options["exif"] = _exif(text)
    image.save(f, format=fmt.upper(), **options)


def _exif(text: str) -> PIL.Image.Exif:
    exif = PIL.Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = _EXIF_ASCII + text.encode("ascii")
    return exif


# ---------------------------------------------------------------------- readers
def read_parameters(path: str | os.PathLike) -> str | None:
    """The A1111 ``parameters`` text of a PNG anysize wrote (None when it has none)."""
    return _png_text(Path(path), "parameters")


def _png_text(path: Path, key: str) -> str | None:
    """A tEXt chunk's value, read chunk by chunk (no decode, so any image size works)."""
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            raise ValueError(f"'{path}': not a PNG file")
        while len(header := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IEND":
                break
            if kind != b"tEXt":
                f.seek(length + 4, os.SEEK_CUR)
                continue
            name, _, value = f.read(length).partition(b"\0")
            f.seek(4, os.SEEK_CUR)
            if name.decode("latin-1") == key:
                return value.decode("latin-1")
    return None


def _tiff_description(path: Path) -> str | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].description or None


def _exif_comment(path: Path) -> str | None:
    with PIL.Image.open(path) as image:
        raw = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if isinstance(raw, bytes) and raw.startswith(_EXIF_ASCII):
        return raw[len(_EXIF_ASCII):].decode("ascii", "replace")
    return raw if isinstance(raw, str) else None
