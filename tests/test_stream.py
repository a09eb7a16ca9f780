"""Streaming output: scratch rasters, pyramid TIFF and Deep Zoom written band by band."""

import math
import xml.etree.ElementTree as ET

import numpy as np
import PIL.Image
import pytest
import tifffile
import torch

from anysize.io import stream
from anysize.io.output import read_metadata, save_image
from anysize.core.vae import tiled_decode
from test_vae import make_vae

META = {"prompt": "a wide meadow", "seed": 7}


def noise(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def test_raster_takes_tiles_in_any_order_and_clips(tmp_path):
    image = noise(300, 410)
    boxes = [(t, l) for t in range(0, 300, 128) for l in range(0, 410, 128)]
    padded = np.pad(image, ((0, 84), (0, 102), (0, 0)))  # tiles overhang the image like a padded decode
    with stream.Raster(tmp_path / "r.raw", 300, 410) as raster:
        for t, l in reversed(boxes):
            raster.write(t, l, padded[t : t + 128, l : l + 128])
        np.testing.assert_array_equal(raster.read(0, 300), image)
        np.testing.assert_array_equal(raster.read(250, 999), image[250:])
    assert not (tmp_path / "r.raw").exists()


def test_halve_averages_and_keeps_odd_edges():
    band = np.array([[[0], [4], [9]], [[8], [4], [9]], [[1], [1], [200]]], np.uint8)
    np.testing.assert_array_equal(stream.halve(band)[..., 0], [[4, 9], [1, 200]])


def test_pyramid_tiff_levels_halve_down_to_one_tile(tmp_path):
    image = noise(700, 1100)
    path = save_image(image, tmp_path / "big.tif", META)
    with tifffile.TiffFile(path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == stream.TILE
    assert [lv.shape[:2] for lv in levels] == [(700, 1100), (350, 550), (175, 275), (88, 138)]
    np.testing.assert_array_equal(levels[0], image)
    for upper, lower in zip(levels, levels[1:]):
        np.testing.assert_array_equal(lower, stream.halve(upper))
    assert read_metadata(path) == META
    assert [p.name for p in tmp_path.iterdir()] == ["big.tif"]  # no scratch left


def test_dzi_layout_tiles_and_metadata(tmp_path):
    image = noise(300, 520)
    path = save_image(image, tmp_path / "pano.dzi", META)
    root = ET.parse(path).getroot()
    ns = "{http://schemas.microsoft.com/deepzoom/2008}"
    assert (root.get("TileSize"), root.get("Overlap"), root.get("Format")) == ("256", "0", "png")
    size = root.find(f"{ns}Size")
    assert (size.get("Width"), size.get("Height")) == ("520", "300")
    files = tmp_path / "pano_files"
    top = math.ceil(math.log2(520))
    assert sorted(int(p.name) for p in files.iterdir() if p.is_dir()) == list(range(top + 1))
    assert sorted(p.name for p in (files / str(top)).iterdir()) == [f"{c}_{r}.png" for c in range(3) for r in range(2)]
    with PIL.Image.open(files / str(top) / "2_1.png") as tile:
        np.testing.assert_array_equal(np.asarray(tile), image[256:300, 512:520])
    with PIL.Image.open(files / "0" / "0_0.png") as tile:
        assert tile.size == (1, 1)
    with PIL.Image.open(files / str(top - 1) / "0_0.png") as tile:
        np.testing.assert_array_equal(np.asarray(tile), stream.halve(image)[:256, :256])
    assert read_metadata(path) == META
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pano.dzi", "pano_files"]


def test_failed_dzi_leaves_the_old_one_whole(tmp_path, monkeypatch):
    path = save_image(noise(40, 60), tmp_path / "x.dzi", {"old": True})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(PIL.Image.Image, "save", broken)
    with pytest.raises(OSError, match="simulated"):
        save_image(noise(50, 70, seed=1), path, META)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert read_metadata(path) == {"old": True}


def test_decode_streams_into_a_raster_and_a_tiff(tmp_path):
    tiny_vae = make_vae()
    latents = torch.randn(1, tiny_vae.config.latent_channels, 19, 27, generator=torch.Generator().manual_seed(0))
    f = 2 ** (len(tiny_vae.config.block_out_channels) - 1)
    expected = tiled_decode(tiny_vae, latents, tile_size=8, mode="fast", tile_batch_size=3)
    h, w = 19 * f - 3, 27 * f - 5  # an image a little smaller than the latent: writes are clipped
    with stream.Raster(tmp_path / "decode.raw", h, w) as raster:
        tiled_decode(tiny_vae, latents, tile_size=8, mode="fast", tile_batch_size=3, out=raster)
        path = save_image(raster, tmp_path / "out.tif", META)
    np.testing.assert_array_equal(tifffile.imread(path), expected[:h, :w])


def test_colour_statistics_and_affine_match_whole_array_maths(tmp_path):
    image = noise(90, 70)
    mean, std = stream.channel_moments(stream.ArrayRows(image))
    flat = image.reshape(-1, 3).astype(np.float64)
    # uint8 sums are exact in float64: mean measured equal, std 1.6e-15 relative (numpy's default rtol 1e-7),
    # the same with numpy's AVX-512 and AVX2 loops disabled (NPY_DISABLE_CPU_FEATURES)
    np.testing.assert_allclose(mean, flat.mean(0))
    np.testing.assert_allclose(std, flat.std(0))
    with stream.Raster(tmp_path / "a.raw", 90, 70) as raster:
        raster.write(0, 0, image)
        stream.apply_affine(raster, np.array([0.5, 1.0, 2.0]), np.array([10.0, 0.0, -100.0]))
        expected = np.clip((image.astype(np.float32) * [0.5, 1, 2] + [10, 0, -100]).round(), 0, 255)
        np.testing.assert_array_equal(raster.read(0, 90), expected.astype(np.uint8))
