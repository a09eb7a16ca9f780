"""anysize.io.output: formats, metadata, tiled TIFF, atomic writes, path checks."""

import os
import stat

import numpy as np
import PIL.Image
import pytest
import tifffile

from anysize.io import output
from anysize.io.output import check_output_path, read_metadata, save_image

META = {"prompt": "a fox, déjà vu ✓", "seed": 7, "width": 90, "height": 70, "steps": 2, "tiling": "fstd",
        "base": "tiny (StableDiffusionPipeline)", "version": "0.1.0"}


def gradient(h: int = 70, w: int = 90) -> np.ndarray:
    """A smooth uint8 RGB image (lossy codecs stay close to it)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", ["png", "tif", "tiff"])
def test_lossless_formats_round_trip_exactly(tmp_path, ext):
    pixels = noise(70, 90)
    path = save_image(pixels, tmp_path / f"out.{ext}", META)
    with PIL.Image.open(path) as image:
        assert image.size == (90, 70)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels)


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "webp"])
def test_lossy_formats_round_trip_size_and_pixels(tmp_path, ext):
    pixels = gradient()
    path = save_image(PIL.Image.fromarray(pixels), tmp_path / f"out.{ext}", META)
    with PIL.Image.open(path) as image:
        assert image.size == (90, 70)
        diff = np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - pixels)
    assert diff.mean() < 3


@pytest.mark.parametrize("ext", ["png", "tif", "jpg", "webp"])
def test_metadata_round_trips(tmp_path, ext):
    path = save_image(gradient(), tmp_path / f"out.{ext}", META)
    assert read_metadata(path) == META


def test_png_metadata_is_a_text_chunk(tmp_path):
    path = save_image(gradient(), tmp_path / "out.png", META)
    with PIL.Image.open(path) as image:
        assert '"seed": 7' in image.info["anysize"]


def test_tiff_metadata_is_the_image_description(tmp_path):
    path = save_image(gradient(), tmp_path / "out.tif", META)
    with tifffile.TiffFile(path) as tif:
        assert '"seed": 7' in tif.pages[0].description


def test_read_metadata_without_metadata_is_empty(tmp_path):
    PIL.Image.fromarray(gradient()).save(tmp_path / "plain.png")
    assert read_metadata(tmp_path / "plain.png") == {}


def test_big_tiff_is_tiled_and_compressed(tmp_path):
    pixels = noise(700, 1000)
    path = save_image(pixels, tmp_path / "big.tif", META)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
        assert page.compression in (tifffile.COMPRESSION.ADOBE_DEFLATE, tifffile.COMPRESSION.DEFLATE)
        assert not tif.is_bigtiff
        np.testing.assert_array_equal(page.asarray(), pixels)


def test_tiff_over_pillows_pixel_limit_is_bigtiff(tmp_path, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    path = save_image(noise(50, 40), tmp_path / "big.tif", META)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff


def test_tiff_takes_an_array_without_pillow(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the TIFF path must not go through Pillow")

    monkeypatch.setattr(PIL.Image, "fromarray", refuse)
    pixels = noise(33, 300)
    path = save_image(pixels, tmp_path / "a.tiff", {})
    np.testing.assert_array_equal(tifffile.imread(path), pixels)


def test_grey_and_rgba_arrays(tmp_path):
    grey = noise(20, 30)[..., 0]
    rgba = np.concatenate([noise(20, 30), np.full((20, 30, 1), 128, np.uint8)], -1)
    np.testing.assert_array_equal(tifffile.imread(save_image(grey, tmp_path / "g.tif")), grey)
    with PIL.Image.open(save_image(rgba, tmp_path / "a.png")) as image:
        np.testing.assert_array_equal(np.asarray(image), rgba)
    with PIL.Image.open(save_image(rgba, tmp_path / "a.jpg")) as image:
        assert image.mode == "RGB"


def test_new_file_gets_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_image(gradient(), tmp_path / "m.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# ---------------------------------------------------------------------- atomicity
def _failing_encoder(im, fp, filename):
    fp.write(b"\x89PNG partial data")
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_failed_png_write_leaves_nothing(tmp_path, monkeypatch, error):
    def encoder(im, fp, filename):
        fp.write(b"\x89PNG partial data")
        raise error("simulated")

    monkeypatch.setitem(PIL.Image.SAVE, "PNG", encoder)
    with pytest.raises(error):
        save_image(gradient(), tmp_path / "out.png", META)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_existing_file(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous image")
    monkeypatch.setitem(PIL.Image.SAVE, "PNG", _failing_encoder)
    with pytest.raises(OSError, match="simulated"):
        save_image(gradient(), target, META)
    assert target.read_bytes() == b"previous image"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_failed_tiff_write_leaves_nothing(tmp_path, monkeypatch):
    def write(self, data, *args, **kwargs):
        next(iter(data))  # some tiles read, some bytes out
        self._fh.write(b"partial")
        raise OSError("simulated")

    monkeypatch.setattr(tifffile.TiffWriter, "write", write)
    with pytest.raises(OSError):
        save_image(noise(10, 10), tmp_path / "out.tif", META)
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_an_existing_file(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    save_image(gradient(), target, META)
    assert read_metadata(target) == META
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


# ---------------------------------------------------------------------- path checks
def test_unknown_extension(tmp_path):
    expected = r"^output path '.*x\.gif': unknown format; use \.png, \.jpg, \.webp, \.tif or \.dzi$"
    with pytest.raises(ValueError, match=expected):
        save_image(gradient(), tmp_path / "x.gif", META)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, message", [
    ("missing/out.png", "does not exist"),
    ("file.txt/out.png", "does not exist"),
    ("adir.png", "is a directory"),
    ("noext", "unknown format"),
])
def test_check_output_path_errors(tmp_path, name, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "adir.png").mkdir()
    with pytest.raises(ValueError, match=message) as info:
        check_output_path(tmp_path / name)
    assert "\n" not in str(info.value)


def test_check_output_path_unwritable_directory(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(output.tempfile, "TemporaryFile", refuse)
    with pytest.raises(ValueError, match="is not writable"):
        check_output_path(tmp_path / "out.png")


def test_check_output_path_format_size_limits(tmp_path):
    with pytest.raises(ValueError, match=r"16383 px a side"):
        check_output_path(tmp_path / "big.webp", (20000, 100))
    check_output_path(tmp_path / "big.tif", (20000, 100))
    assert check_output_path(tmp_path / "ok.JPG", (60000, 100)) == tmp_path / "ok.JPG"


def test_bad_array(tmp_path):
    with pytest.raises(ValueError, match="must be uint8"):
        save_image(np.zeros((4, 4, 3), np.float32), tmp_path / "x.png")
