"""``anysize view``: pan and zoom a result in the browser, with OpenSeadragon served from this machine.

A small HTTP server serves one page, the vendored OpenSeadragon (``static/openseadragon``, so no network
is needed) and the image as a Deep Zoom image (DZI): tiles of 256 px without overlap, level ``L`` being
the image reduced by ``2 ** (max_level - L)`` with ``max_level = ceil(log2(max(W, H)))``.

- ``NAME.dzi``: the descriptor and its tiles ``NAME_files/LEVEL/COL_ROW.FORMAT`` are served as they are.
- ``.tif`` / ``.tiff``: a tiled pyramid TIFF (reduced levels as SubIFDs, each half the previous, as
  ``anysize`` writes it). A tile is cut from the pyramid level of its own scale by decoding only the
  TIFF tiles it covers, so level 0 is never read whole; levels coarser than the file's smallest are
  reduced from that one, held in memory.
- ``.png`` / ``.jpg`` / ``.webp``: decoded once with Pillow; tiles are cut from it and its halvings.

The standard library's ``http.server`` is all one local user needs (a few dozen tile requests a second),
so ``anysize view`` adds no web framework dependency, and it never imports torch.
"""

from __future__ import annotations

import io
import json
import mimetypes
import os
import re
import socket
import sys
import threading
import webbrowser
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import PIL.Image
import psutil

from .stream import TILE, dzi_descriptor  # the Deep Zoom layout anysize writes, served the same way

STATIC = Path(__file__).parent.parent / "static"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")
MEMORY_FRACTION = 0.5  # an image loaded whole may take at most this share of the available memory
_TILE_PATH = re.compile(r"(\d+)/(\d+)_(\d+)\.(png|jpe?g|webp)")  # LEVEL/COL_ROW.FORMAT below NAME_files/
_TIFF_PHOTOMETRIC = (1, 2)  # minisblack, rgb

Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels of one level
Served = tuple[bytes, str]  # body, content type


def max_level(width: int, height: int) -> int:
    """The Deep Zoom level of the full-size image, ``ceil(log2(max(width, height)))``; level 0 is 1 x 1."""
    return (max(width, height) - 1).bit_length()


# ---------------------------------------------------------------------- tile sources
class TileSource(ABC):
    """A Deep Zoom image to serve: its descriptor and its tiles, by their path below ``NAME_files/``."""

    width: int
    height: int
    kind: str  # what the file is, for the start-up line

    @abstractmethod
    def descriptor(self) -> bytes:
        """The ``.dzi`` XML."""

    @abstractmethod
    def tile(self, path: str) -> Served | None:
        """The tile at ``LEVEL/COL_ROW.FORMAT`` and its content type; None when there is no such tile."""

    def close(self) -> None:
        """Release the file, if one is held open."""

    def __enter__(self) -> TileSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DziFiles(TileSource):
    """A Deep Zoom image on disk: ``NAME.dzi`` and ``NAME_files/``, served as static files."""

    kind = "Deep Zoom"

    def __init__(self, path: Path):
        self._xml = path.read_bytes()
        self.width, self.height = _dzi_size(self._xml, path)
        self._files = path.with_name(f"{path.stem}_files")

    def descriptor(self) -> bytes:
        return self._xml

    def tile(self, path: str) -> Served | None:
        return _file(self._files, path) if _TILE_PATH.fullmatch(path) else None


class CutTiles(TileSource):
    """Tiles cut on request and sent as PNG, from :meth:`region`."""

    def descriptor(self) -> bytes:
        return dzi_descriptor(self.width, self.height)

    @abstractmethod
    def region(self, factor: int, box: Box) -> np.ndarray:
        """The pixels inside ``box`` of the image reduced by ``factor`` (a power of two), uint8 HW or HWC."""

    def tile(self, path: str) -> Served | None:
        match = _TILE_PATH.fullmatch(path)
        top = max_level(self.width, self.height)
        if match is None or match[4] != "png" or int(match[1]) > top:
            return None
        factor = 2 ** (top - int(match[1]))
        width, height = -(-self.width // factor), -(-self.height // factor)
        left, upper = int(match[2]) * TILE, int(match[3]) * TILE
        if left >= width or upper >= height:
            return None
        pixels = self.region(factor, (left, upper, min(left + TILE, width), min(upper + TILE, height)))
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buffer, "png", compress_level=1)  # speed over size: it's local
        return buffer.getvalue(), "image/png"


class Halvings:
    """An image in memory and its halvings (2x2 box average, Pillow's ``reduce``, sides rounded up),
    each made on first use."""

    def __init__(self, image: PIL.Image.Image):
        self._levels = [image]
        self._lock = threading.Lock()

    def region(self, factor: int, box: Box) -> np.ndarray:
        """The pixels inside ``box`` of the image reduced by ``factor`` (a power of two)."""
        k = factor.bit_length() - 1
        with self._lock:
            while len(self._levels) <= k:
                self._levels.append(self._levels[-1].reduce(2))
        return np.asarray(self._levels[k].crop(box))


class ImageTiles(CutTiles):
    """A PNG, JPEG or WebP image, decoded once and held in memory."""

    kind = "in memory"

    def __init__(self, path: Path):
        image = _load_image(path)
        self.width, self.height = image.size
        self._halvings = Halvings(image)

    def region(self, factor: int, box: Box) -> np.ndarray:
        return self._halvings.region(factor, box)


class TiffTiles(CutTiles):
    """A tiled pyramid TIFF read with tifffile: each tile from the pyramid level of its scale, decoding
    only the TIFF tiles (or strips) it covers. Levels are used while each is exactly half the previous
    (sides rounded up); coarser ones come from :class:`Halvings` of the smallest, read whole once."""

    kind = "pyramid TIFF"

    def __init__(self, path: Path):
        import tifffile

        try:
            self._tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, ValueError) as exc:
            raise ValueError(f"OUT '{path}': not a TIFF file tifffile can read ({exc})") from None
        self._lock = threading.RLock()  # one file handle, shared by the server's threads
        self._coarse: Halvings | None = None
        try:
            self._pages = self._pyramid(path)
        except BaseException:
            self._tif.close()
            raise
        try:
            self._read(self._pages[-1], (0, 0, 1, 1))  # fail now, not tile by tile, on a codec tifffile lacks
        except Exception as exc:
            self._tif.close()
            raise ValueError(f"OUT '{path}': cannot decode its tiles ({type(exc).__name__}: {exc})") from None

    def _pyramid(self, path: Path) -> list:
        """The pages of the exact halvings, level 0 first; ValueError for pixels this viewer cannot show."""
        if not self._tif.series:
            raise ValueError(f"OUT '{path}': a TIFF without images")
        levels = self._tif.series[0].levels
        base = levels[0].keyframe
        problem = _tiff_problem(base)
        if problem:
            raise ValueError(f"OUT '{path}': {problem}; anysize view shows 8-bit grey, RGB or RGBA TIFFs")
        self.width, self.height = base.imagewidth, base.imagelength
        pages = [base]
        for k, level in enumerate(levels[1:], 1):
            page = level.keyframe
            if (page.imagewidth, page.imagelength) != (-(-self.width // 2**k), -(-self.height // 2**k)) \
                    or _tiff_problem(page):
                break
            pages.append(page)
        smallest = pages[-1]
        _check_memory(smallest.imagewidth, smallest.imagelength, smallest.samplesperpixel, path,
                      "its smallest pyramid level is", "write it with reduced levels (anysize's .tif output)")
        return pages

    def region(self, factor: int, box: Box) -> np.ndarray:
        k = factor.bit_length() - 1
        if k < len(self._pages):
            return self._read(self._pages[k], box)
        return self._coarse_halvings().region(factor >> (len(self._pages) - 1), box)

    def _coarse_halvings(self) -> Halvings:
        with self._lock:
            if self._coarse is None:
                page = self._pages[-1]
                pixels = self._read(page, (0, 0, page.imagewidth, page.imagelength))
                self._coarse = Halvings(PIL.Image.fromarray(pixels))
            return self._coarse

    def _read(self, page, box: Box) -> np.ndarray:
        """The pixels of ``page`` inside ``box``, from the segments (tiles or strips) that overlap it."""
        left, top, right, bottom = box
        if page.is_tiled:
            seg_h, seg_w = page.tilelength, page.tilewidth
        else:
            seg_h, seg_w = min(page.rowsperstrip or page.imagelength, page.imagelength), page.imagewidth
        across = -(-page.imagewidth // seg_w)
        out = np.zeros((bottom - top, right - left, page.samplesperpixel), np.uint8)
        for row in range(top // seg_h, (bottom - 1) // seg_h + 1):
            for col in range(left // seg_w, (right - 1) // seg_w + 1):
                segment = self._segment(page, row * across + col)
                if segment is None:
                    continue  # a sparse TIFF's empty tile reads as zeros
                y0, x0 = row * seg_h, col * seg_w
                ys, ye = max(top, y0), min(bottom, y0 + segment.shape[0])
                xs, xe = max(left, x0), min(right, x0 + segment.shape[1])
                out[ys - top:ye - top, xs - left:xe - left] = segment[ys - y0:ye - y0, xs - x0:xe - x0]
        return out[..., 0] if out.shape[2] == 1 else out

    def _segment(self, page, index: int) -> np.ndarray | None:
        """Segment ``index`` of ``page`` decoded, H x W x samples; None when the file stores none."""
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            return None
        with self._lock:
            handle = self._tif.filehandle
            handle.seek(offset)
            data = handle.read(count)
        array, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        return array[0]  # drop the depth axis

    def close(self) -> None:
        self._tif.close()


def _tiff_problem(page) -> str | None:
    """Why this viewer cannot show ``page``, or None."""
    if page.dtype != np.uint8:
        return f"{page.dtype} samples"
    if page.imagedepth != 1:
        return "a volume"
    if page.samplesperpixel not in (1, 3, 4):
        return f"{page.samplesperpixel} samples a pixel"
    if page.samplesperpixel > 1 and int(page.planarconfig) != 1:
        return "separate colour planes"
    if int(page.photometric) not in _TIFF_PHOTOMETRIC:
        return f"photometric {page.photometric.name.lower()}"
    return None


def open_image(path: str | os.PathLike) -> TileSource:
    """The tile source for ``path`` by its extension (see the module's docstring); a one-line ValueError
    for a missing file, an unknown extension or a file that cannot be read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise ValueError(f"OUT '{path}': no such file")
    if not path.is_file():
        raise ValueError(f"OUT '{path}': not a file")
    if suffix == ".dzi":
        return DziFiles(path)
    if suffix in TIFF_SUFFIXES:
        return TiffTiles(path)
    if suffix in IMAGE_SUFFIXES:
        return ImageTiles(path)
    raise ValueError(f"OUT '{path}': unknown format; use .dzi, .tif, .png, .jpg or .webp")


def _dzi_size(xml: bytes, path: Path) -> tuple[int, int]:
    """``(width, height)`` from a Deep Zoom descriptor; ValueError if it is not one."""
    try:
        root = ET.fromstring(xml)
        size = next(child for child in root if child.tag.rpartition("}")[2] == "Size")
        width, height = int(size.get("Width", "")), int(size.get("Height", ""))
        if root.tag.rpartition("}")[2] != "Image" or min(width, height) < 1:
            raise ValueError
    except (ET.ParseError, StopIteration, ValueError):
        raise ValueError(f"OUT '{path}': not a Deep Zoom descriptor (<Image ...><Size Width Height/>)") from None
    return width, height


def _load_image(path: Path) -> PIL.Image.Image:
    """The image decoded, as L, RGB or RGBA; a one-line ValueError when it cannot be read or held."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = None  # anysize's results pass Pillow's bomb limit; memory is checked below
    try:
        image = PIL.Image.open(path)
    except PIL.UnidentifiedImageError:
        raise ValueError(f"OUT '{path}': not an image file Pillow can read") from None
    except OSError as exc:
        raise ValueError(f"OUT '{path}': cannot be read ({exc})") from None
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = limit
    try:
        _check_memory(image.width, image.height, len(image.getbands()), path, "the image is",
                      "save it as .tif or .dzi")
        if image.mode in ("L", "RGB", "RGBA"):
            image.load()  # Pillow closes the file once a single-frame image is loaded
            return image
        alpha = "A" in image.getbands() or "transparency" in image.info
        with image:
            return image.convert("RGBA" if alpha else "RGB")
    except (OSError, SyntaxError) as exc:  # a truncated or corrupt file
        image.close()
        raise ValueError(f"OUT '{path}': cannot be read ({exc})") from None
    except ValueError:
        image.close()
        raise


def _check_memory(width: int, height: int, channels: int, path: Path, what: str, advice: str) -> None:
    """ValueError when ``width x height`` pixels (and their halvings, a third more) would take more than
    :data:`MEMORY_FRACTION` of the available memory."""
    need = width * height * max(channels, 3) * 4 / 3
    free = psutil.virtual_memory().available
    if need > MEMORY_FRACTION * free:
        raise ValueError(f"OUT '{path}': {what} {width}x{height}, about {need / 2**30:.1f} GiB in memory, "
                         f"more than {MEMORY_FRACTION:.0%} of the {free / 2**30:.1f} GiB available; {advice}")


def _file(root: Path, relative: str) -> Served | None:
    """The file ``root / relative`` and its content type; None when it is missing or outside ``root``."""
    root = root.resolve()
    file = (root / relative).resolve()
    if not file.is_relative_to(root) or not file.is_file():
        return None
    return file.read_bytes(), mimetypes.guess_type(file.name)[0] or "application/octet-stream"


# ---------------------------------------------------------------------- server
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - anysize view</title>
<style>
  html, body {{ margin: 0; height: 100%; background: #000; color: #bbb; font: 13px sans-serif; }}
  #view {{ position: absolute; inset: 0; }}
  #caption {{ position: absolute; left: 8px; bottom: 6px; pointer-events: none; }}
</style>
</head>
<body>
<div id="view"></div>
<div id="caption">{title} &middot; {width} x {height} px</div>
<script src="/static/openseadragon/openseadragon.min.js"></script>
<script>OpenSeadragon({options});</script>
</body>
</html>
"""
_VIEWER_OPTIONS = {"id": "view", "prefixUrl": "/static/openseadragon/images/", "showNavigator": True,
                   "maxZoomPixelRatio": 8}


def viewer_page(title: str, width: int, height: int, descriptor_url: str = "/image.dzi") -> bytes:
    """The viewer page: OpenSeadragon on the whole window showing the Deep Zoom image at
    ``descriptor_url`` (its tiles beside it, as ``NAME_files/``), a caption with the title and size.
    ``anysize view`` and ``anysize serve`` both serve it."""
    options = {**_VIEWER_OPTIONS, "tileSources": descriptor_url}
    return _PAGE.format(title=escape(title), width=width, height=height, options=json.dumps(options)).encode()


class ViewServer(ThreadingHTTPServer):
    """Serves the viewer page at ``/``, OpenSeadragon at ``/static/``, and ``source`` as ``/image.dzi``
    with its tiles at ``/image_files/``."""

    daemon_threads = True

    def __init__(self, source: TileSource, title: str, host: str = "127.0.0.1", port: int = 0):
        self.source, self.title = source, title
        if ":" in host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise OSError(f"cannot listen on {host} port {port} ({exc.strerror or exc})") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def page(self) -> bytes:
        """The viewer page: OpenSeadragon on the whole window, a caption with the file's name and size."""
        return viewer_page(self.title, self.source.width, self.source.height)

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a browser closing a connection is no error
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: ViewServer
    protocol_version = "HTTP/1.1"  # keep-alive: a view fetches dozens of tiles at once

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        try:
            found = self._route(path)
        except Exception as exc:
            print(f"anysize view: {path}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR)
            return
        if found is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        body, content_type = found
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")  # the file may be written again while viewed
        self.end_headers()
        self.wfile.write(body)

    def _route(self, path: str) -> Served | None:
        source = self.server.source
        if path in ("/", "/index.html"):
            return self.server.page(), "text/html; charset=utf-8"
        if path == "/image.dzi":
            return source.descriptor(), "application/xml"
        if path.startswith("/image_files/"):
            return source.tile(path.removeprefix("/image_files/"))
        if path.startswith("/static/"):
            return _file(STATIC, path.removeprefix("/static/"))
        return None

    def log_message(self, format: str, *args) -> None:
        """No line per request: a view makes hundreds."""


def serve(path: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, open_browser: bool = False) -> int:
    """Serve ``path`` until Ctrl-C: its URL on stdout, a line about it on stderr; returns 0. ``port`` 0
    picks a free port; ``open_browser`` opens the page in the default browser."""
    with open_image(path) as source, ViewServer(source, Path(path).name, host, port) as server:
        print(server.url, flush=True)
        print(f"anysize view: {path}, {source.width}x{source.height} px ({source.kind}); Ctrl-C stops",
              file=sys.stderr, flush=True)
        if open_browser:
            webbrowser.open(server.url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("anysize view: stopped", file=sys.stderr, flush=True)
    return 0
