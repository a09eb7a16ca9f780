"""``anysize view``: the Deep Zoom descriptor and tiles served for a .dzi, a pyramid TIFF and a PNG, the
page and its vendored OpenSeadragon, path traversal, the command line, and a headless browser's view."""

import contextlib
import http.client
import io
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tifffile

from anysize import cli
from anysize.io import view

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1500, 700
TOP = 11  # ceil(log2(1500)): the Deep Zoom level of the full-size image
DISC = (40, 170, 230)  # the colour of the disc in the fixture's centre
NS = "{http://schemas.microsoft.com/deepzoom/2008}"


# ---------------------------------------------------------------------- fixture image and its files
def make_image() -> np.ndarray:
    """1500 x 700 RGB: a red/green gradient, a white box, a black bar and a blue disc in the centre."""
    y, x = np.mgrid[:HEIGHT, :WIDTH]
    image = np.stack([55 + x * 200 // WIDTH, 55 + y * 200 // HEIGHT, np.full_like(x, 90)], -1).astype(np.uint8)
    image[100:300, 150:400] = 255
    image[500:540, 900:1400] = 0
    image[(x - WIDTH // 2) ** 2 + (y - HEIGHT // 2) ** 2 < 200**2] = DISC
    return image


def halve(a: np.ndarray) -> np.ndarray:
    """2x2 box average, rounded, sides rounded up (an odd last row or column averaged with itself)."""
    a = np.concatenate([a, a[-1:]], 0) if a.shape[0] % 2 else a
    a = np.concatenate([a, a[:, -1:]], 1) if a.shape[1] % 2 else a
    s = a.astype(np.uint16)
    return ((s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2] + 2) // 4).astype(np.uint8)


def levels(image: np.ndarray, smallest: int = 1) -> list[np.ndarray]:
    """``image`` and its halvings until the longer side is at most ``smallest``."""
    out = [image]
    while max(out[-1].shape[:2]) > smallest:
        out.append(halve(out[-1]))
    return out


def write_dzi(path: Path, image: np.ndarray) -> None:
    files = path.with_name(f"{path.stem}_files")
    for k, level in enumerate(levels(image)):
        folder = files / str(TOP - k)
        folder.mkdir(parents=True)
        for top in range(0, level.shape[0], 256):
            for left in range(0, level.shape[1], 256):
                PIL.Image.fromarray(level[top:top + 256, left:left + 256]).save(folder / f"{left // 256}_{top // 256}.png")
    path.write_bytes(view.dzi_descriptor(WIDTH, HEIGHT))


def write_pyramid_tiff(path: Path, image: np.ndarray) -> None:
    """Level 0 with its halvings down to 256 px as SubIFDs, tiles of 256 px, zlib."""
    pyramid = levels(image, smallest=256)
    with tifffile.TiffWriter(path) as tif:
        tif.write(pyramid[0], tile=(256, 256), compression="zlib", subifds=len(pyramid) - 1)
        for level in pyramid[1:]:
            tif.write(level, tile=(256, 256), compression="zlib", subfiletype=1)


def write_file(tmp_path: Path, kind: str, image: np.ndarray) -> Path:
    if kind == "dzi":
        write_dzi(tmp_path / "image.dzi", image)
        return tmp_path / "image.dzi"
    if kind == "tiff":
        write_pyramid_tiff(tmp_path / "image.tif", image)
        return tmp_path / "image.tif"
    if kind == "striped-grey-tiff":  # no pyramid, strips: every level past 0 comes from memory
        tifffile.imwrite(tmp_path / "grey.tiff", image[..., 1], rowsperstrip=100)
        return tmp_path / "grey.tiff"
    PIL.Image.fromarray(image).save(tmp_path / "image.png")
    return tmp_path / "image.png"


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return make_image()


@contextlib.contextmanager
def serving(path: Path):
    """The URL of a :class:`view.ViewServer` for ``path`` on a free port, served from a thread."""
    with view.open_image(path) as source, view.ViewServer(source, path.name) as server:
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield server.url
        finally:
            server.shutdown()
            thread.join(5)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def raw_status(url: str, path: str) -> int:
    """The status of a GET for ``path`` sent exactly as written (urllib would normalise it)."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


# ---------------------------------------------------------------------- descriptor and tiles
TILES = [(TOP, 0, 0), (TOP, 5, 2), (TOP, 3, 1), (TOP - 1, 2, 1), (TOP - 3, 0, 0), (5, 0, 0), (0, 0, 0)]


@pytest.mark.parametrize("kind", ["dzi", "tiff", "png", "striped-grey-tiff"])
def test_descriptor_and_tiles(tmp_path, image, kind):
    path = write_file(tmp_path, kind, image)
    grey = kind == "striped-grey-tiff"
    expected_levels = levels(image[..., 1] if grey else image)
    with serving(path) as url:
        status, body = get(url + "image.dzi")
        assert status == 200
        root = ET.fromstring(body)
        assert (root.get("TileSize"), root.get("Overlap"), root.get("Format")) == ("256", "0", "png")
        size = root.find(f"{NS}Size")
        assert (size.get("Width"), size.get("Height")) == (str(WIDTH), str(HEIGHT))
        for level, col, row in TILES:
            status, body = get(f"{url}image_files/{level}/{col}_{row}.png")
            assert status == 200, (level, col, row)
            tile = np.asarray(PIL.Image.open(io.BytesIO(body)))
            expected = expected_levels[TOP - level][row * 256:(row + 1) * 256, col * 256:(col + 1) * 256]
            assert tile.shape == expected.shape, (level, col, row)
            np.testing.assert_array_equal(tile, expected, err_msg=f"tile {level}/{col}_{row}")
        for missing in (f"{TOP}/6_0.png", f"{TOP}/0_3.png", f"{TOP + 1}/0_0.png", f"{TOP}/0_0.jpeg", "x.png"):
            assert get(f"{url}image_files/{missing}")[0] == 404, missing


def test_page_and_vendored_openseadragon(tmp_path, image):
    path = write_file(tmp_path, "png", image)
    with serving(path) as url:
        status, page = get(url)
        assert status == 200
        assert b"/static/openseadragon/openseadragon.min.js" in page and b'"/image.dzi"' in page
        assert b"image.png" in page and b"1500 x 700" in page
        status, script = get(url + "static/openseadragon/openseadragon.min.js")
        assert status == 200 and script.startswith(b"//! openseadragon")
        status, button = get(url + "static/openseadragon/images/zoomin_rest.png")
        assert status == 200 and button.startswith(b"\x89PNG")
    vendored = ROOT / "anysize" / "static" / "openseadragon"
    assert "BSD" in (vendored / "LICENSE.txt").read_text() or "Redistribution" in (vendored / "LICENSE.txt").read_text()
    assert "npm" in (vendored / "README.txt").read_text()


def test_no_path_traversal(tmp_path, image):
    path = write_file(tmp_path, "dzi", image)
    (tmp_path / "secret.png").write_bytes(b"secret")
    with serving(path) as url:
        assert raw_status(url, f"/image_files/{TOP}/0_0.png") == 200
        for attack in ("/image_files/../secret.png", "/image_files/%2e%2e/secret.png", "/image_files/11/../../secret.png",
                       "/image_files/11/..%2f..%2fsecret.png", "/static/../view.py", "/static/%2e%2e/cli.py",
                       "/static/openseadragon/../../view.py", "/static//etc/passwd", "/static/%2fetc%2fpasswd",
                       "/../../etc/passwd", "/image.dzi/../secret.png"):
            assert raw_status(url, attack) == 404, attack


# ---------------------------------------------------------------------- command line
def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name, content, words", [
    ("missing.png", None, ["missing.png", "no such file"]),
    ("image.bmp", b"BM", ["image.bmp", "unknown format"]),
    ("broken.png", b"not a png", ["broken.png", "not an image"]),
    ("broken.tif", b"not a tiff", ["broken.tif", "not a TIFF"]),
    ("broken.dzi", b"<Image/>", ["broken.dzi", "not a Deep Zoom descriptor"]),
])
def test_cli_errors_are_one_line(tmp_path, capsys, name, content, words):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    code, out, err = run(capsys, "view", tmp_path / name)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("anysize: error: OUT "), err
    assert all(word in err for word in words), err


def test_cli_bad_port(tmp_path, capsys):
    code, _, err = run(capsys, "view", tmp_path / "x.png", "--port", "70000")
    assert code == 2 and "--port" in err and "65535" in err


def test_cli_serves_until_ctrl_c(tmp_path, image):
    """The real command in a subprocess: URL on stdout, tiles served, SIGINT stops it with one line;
    torch is never imported."""
    path = write_file(tmp_path, "png", image)
    probe = ("import runpy, sys, atexit; "
             "atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr)); "
             "sys.argv = ['anysize', 'view', sys.argv[1], '--no-browser']; runpy.run_module('anysize', run_name='__main__')")
    # SIGINT back to its default in the child: a shell ignores it for background jobs (pytest ... &)
    proc = subprocess.Popen([sys.executable, "-c", probe, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/"), url
        assert get(url + "image.dzi")[0] == 200
        assert get(url + f"image_files/{TOP}/0_0.png")[0] == 200
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
    finally:
        proc.kill()
    err = proc.stderr.read().strip().splitlines()
    assert code in (0, 130), err
    assert err[0].startswith(f"anysize view: {path}, 1500x700 px") and err[1] == "anysize view: stopped", err
    assert err[2:] == ["False"], "anysize view imported torch"


# ---------------------------------------------------------------------- what a person sees
def test_headless_browser_shows_the_image(tmp_path, image):
    """Chromium loads the page; the screenshot shows the image fitted to the window: the blue disc in the
    centre, the gradient at the left, the black page above and below."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("no 'chromium' or 'chromium-browser' binary on PATH: install Debian's chromium "
                    "(apt-get install -y chromium) to run this test")
    path = write_file(tmp_path, "tiff", image)
    shot = tmp_path / "shot.png"
    with serving(path) as url:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                        "--window-size=800,600", "--virtual-time-budget=5000", url],
                       check=True, capture_output=True, timeout=60)
    pixels = np.asarray(PIL.Image.open(shot).convert("RGB")).astype(float)
    assert pixels.shape == (600, 800, 3)
    # The image is fitted to the width, centred. Headless Chromium lays the page out in a shorter viewport
    # (the window less its toolbars) and stretches it to 600 rows for the screenshot, so only the middle
    # row keeps its place: row 300 shows the image's row 350, and column x its column x * 1500 / 800.
    centre = pixels[280:320, 380:420].mean((0, 1))
    assert np.abs(centre - DISC).max() < 12, f"centre of the screenshot {centre}, the disc is {DISC}"
    left = pixels[295:305, 35:45].mean((0, 1))
    expected = image[345:355, 65:85].mean((0, 1))
    assert np.abs(left - expected).max() < 12, f"left of the screenshot {left}, the image there {expected}"
    # away from the zoom buttons (top left; they fade out only after a while), the navigator (top right)
    # and the caption (bottom left)
    assert pixels[:20, 200:600].max() < 10 and pixels[-20:, 400:].max() < 10, "no black page above and below"
