"""The command line, run in-process through ``main`` with tiny random-weight models (``model_dirs``)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import anysize
from anysize import cli
from anysize.io.output import read_metadata

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--upscale-steps", "2", "--seed", "7"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code: int, err: str, expected_code: int, *words: str) -> None:
    """Non-zero exit, exactly one stderr line ``anysize: error: ...`` with ``words`` in it, no traceback."""
    assert code == expected_code, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("anysize: error: ")
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0]


@pytest.fixture
def models(model_dirs) -> list[str]:
    base, upscaler = model_dirs
    return ["--base", str(base), "--upscaler", str(upscaler)]


# ---------------------------------------------------------------------- working commands
def test_help_in_a_subprocess_without_torch():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "anysize", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("generate", "upscale", "buckets", "train", "view", "serve", "resume"):
        assert command in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "torch" not in imported and "diffusers" not in imported


def test_generate_writes_png_of_exact_size_with_metadata(capsys, tmp_path, models):
    out = tmp_path / "fox.png"
    code, stdout, stderr = run(capsys, "generate", "a red fox", "--size", "200x120", "-o", out, *FAST, *models)
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    assert "stage 1: bucket 84x52 (stretched 1.03x to the ratio) -> stage 2: 1 pass (200x120) -> 200x120; seed 7" in stderr
    with PIL.Image.open(out) as image:
        assert image.size == (200, 120) and image.mode == "RGB"
    meta = read_metadata(out)
    assert meta["prompt"] == "a red fox" and (meta["width"], meta["height"]) == (200, 120)
    assert (meta["seed"], meta["steps"], meta["upscale_steps"], meta["guidance"]) == (7, 2, 2, 7.5)
    assert meta["tiling"] == "fstd" and meta["version"] == anysize.__version__
    assert meta["base"].startswith("base") and meta["upscaler"].startswith("upscaler")
    assert meta["command"] == "generate" and meta["base_size"] == [84, 52]
    assert [p.name for p in tmp_path.iterdir()] == ["fox.png"]


def test_upscale_writes_tiff_with_metadata(capsys, tmp_path, models):
    source = tmp_path / "small.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "big.tif"
    code, stdout, stderr = run(capsys, "upscale", source, "--size", "100x60", "-o", out, "--steps", "2",
                               "--tiling", "overlap", "--quiet", *models)
    assert code == 0, stderr
    assert stdout.strip() == str(out) and stderr == ""
    with PIL.Image.open(out) as image:
        assert image.size == (100, 60)
    meta = read_metadata(out)
    assert meta["source_size"] == [50, 30] and meta["steps"] == 2 and meta["tiling"] == "overlap"
    assert isinstance(meta["seed"], int) and meta["command"] == "upscale"


def test_generate_writes_deep_zoom(capsys, tmp_path, models):
    out = tmp_path / "wide.dzi"
    code, stdout, stderr = run(capsys, "generate", "a wide sea", "--size", "300x100", "-o", out, "--quiet",
                               *FAST, *models)
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.dzi", "wide_files"]
    with PIL.Image.open(tmp_path / "wide_files" / "9" / "1_0.png") as tile:  # 2^9 >= 300: the full size
        assert tile.size == (44, 100)
    meta = read_metadata(out)
    assert meta["seed"] == 7 and meta["width"] == 300 and meta["command"] == "generate"


def test_upscale_with_an_upscaler_alone(capsys, tmp_path, model_dirs):
    source = tmp_path / "small.png"
    PIL.Image.new("RGB", (40, 30), (30, 90, 200)).save(source)
    out = tmp_path / "big.png"
    code, _, stderr = run(capsys, "upscale", source, "--size", "150x110", "-o", out, "--steps", "2", "--quiet",
                          "--upscaler", model_dirs[1])
    assert code == 0, stderr
    with PIL.Image.open(out) as image:
        assert image.size == (150, 110)


def test_img2img_upscaling_with_the_base_model(capsys, tmp_path, model_dirs):
    out = tmp_path / "fox.webp"
    code, _, stderr = run(capsys, "generate", "a fox", "--size", "120x96", "-o", out, *FAST, "--quiet",
                          "--base", model_dirs[0], "--img2img", "--strength", "0.5")
    assert code == 0, stderr
    with PIL.Image.open(out) as image:
        assert image.size == (120, 96)
    meta = read_metadata(out)
    assert meta["strength"] == 0.5 and meta["upscaler"] == "base (img2img)"


def test_same_seed_same_pixels(capsys, tmp_path, models):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, batch in zip(paths, ("2", "8")):
        code, _, stderr = run(capsys, "generate", "a fox", "--size", "100x72", "-o", path, *FAST, "--quiet",
                              "--tile-batch", batch, *models)
        assert code == 0, stderr
    a, b = (np.asarray(PIL.Image.open(p)) for p in paths)
    np.testing.assert_array_equal(a, b)


def test_tiling_options_reach_the_tiling_config(capsys, tmp_path, models, monkeypatch):
    from anysize.pipeline import AnySizePipeline

    seen, run_plan = [], AnySizePipeline.run
    monkeypatch.setattr(AnySizePipeline, "run", lambda self, plan, **kw: seen.append(plan) or run_plan(self, plan, **kw))
    out = tmp_path / "o.png"
    code, _, stderr = run(capsys, "generate", "a fox", "--size", "300x77", "-o", out, *FAST, "--quiet",
                          "--tiling", "overlap", "--tile-size", "16", "--tile-stride", "12", "--tile-weighting", "linear",
                          "--color-fix", "none", *models)
    assert code == 0, stderr
    (plan,) = seen
    tiling = [p.tiling for p in plan.phases if p.kind == "sr"][0]
    assert (tiling.method, tiling.tile_size, tiling.stride, tiling.weighting) == ("overlap", 16, 12, "linear")
    assert plan.request.color_fix == "none" and not plan.request.color_fixed
    seen.clear()
    code, _, stderr = run(capsys, "generate", "a fox", "--size", "300x77", "-o", out, *FAST, "--quiet",
                          "--tile-edges", "clamp", "--tile-shift", "alternate", "--tile-last-step", "single", *models)
    assert code == 0, stderr
    tiling = [p.tiling for p in seen[0].phases if p.kind == "sr"][0]
    assert (tiling.method, tiling.edges, tiling.shift, tiling.last_step) == ("fstd", "clamp", "alternate", "single")


def test_buckets_lists_and_maps(capsys):
    code, out, _ = run(capsys, "buckets", "--size", "1920x1080")
    assert code == 0
    assert " *   704 x 384   0.545" in out and out.strip().endswith("1920x1080 (ratio 0.562) -> bucket 704x384 (stretched 1.03x to the ratio)")
    assert len([line for line in out.splitlines() if line.startswith((" * ", "   "))]) == 9
    code, out, _ = run(capsys, "buckets", "--size", "4000x500", "--area", 1024 * 1024, "--granularity", 64,
                       "--panorama", "tiled")
    assert code == 0 and "-> panorama" in out and "samples tiled" in out and "*" not in out
    code, out, _ = run(capsys, "buckets", "--size", "4000x500", "--area", 1024 * 1024, "--granularity", 64)
    assert code == 0 and out.strip().endswith("-> bucket 1408x704 (stretched 4.00x to the ratio)") and "*" in out


@pytest.mark.parametrize("text, size", [("640x480", (640, 480)), ("640*480", (640, 480)), ("640X480", (640, 480)),
                                        (" 8x9 ", (8, 9))])
def test_parse_size(text, size):
    assert cli.parse_size(text) == size


def test_tiling_choices_match_the_library():
    from anysize.core.tiling import METHODS

    assert cli.TILING == METHODS


def test_train_rejects_bad_arguments_in_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "train", "base", "-o", tmp_path / "run", "--data", tmp_path / "missing")
    assert_one_error(code, err, 2, "data=")
    code, _, err = run(capsys, "train", "gan", "-o", tmp_path / "run")
    assert_one_error(code, err, 2, "gan")


# ---------------------------------------------------------------------- errors: one line, no file
BAD_SIZES = [("0x5", "'0x5'"), ("-3x4", "'-3x4'"), ("12", "'12'"), ("axb", "'axb'"), ("7x100", "'7x100'")]


@pytest.mark.parametrize("size, shown", BAD_SIZES)
def test_bad_size(capsys, tmp_path, models, size, shown):
    code, _, err = run(capsys, "generate", "x", "--size", size, "-o", tmp_path / "o.png", *models)
    assert_one_error(code, err, 2, "--size", shown, ">= 8")
    assert list(tmp_path.iterdir()) == []


def _bad_cases(tmp: Path, base: str, upscaler: str) -> dict[str, tuple[list[str], int, tuple[str, ...]]]:
    """name -> (argv, exit code, words in the message); every one must fail before writing anything."""
    (tmp / "dummy.ckpt").write_bytes(b"not really a checkpoint")
    (tmp / "notes.txt").write_text("not an image")
    (tmp / "adir.png").mkdir()
    out = str(tmp / "out.png")
    gen = ["generate", "a fox", "--size", "96x64", *FAST]
    models = ["--base", base, "--upscaler", upscaler]
    return {
        "steps 0": ([*gen, "--steps", "0", "-o", out, *models], 2, ("--steps", "'0'", ">= 1")),
        "upscale steps 0": ([*gen, "--upscale-steps", "0", "-o", out, *models], 2, ("--upscale-steps",)),
        "tile size 4": ([*gen, "--tile-size", "4", "-o", out, *models], 2, ("--tile-size",)),
        "negative guidance": ([*gen, "--guidance", "-1", "-o", out, *models], 2, ("--guidance",)),
        "strength 0": ([*gen, "--strength", "0", "-o", out, *models], 2, ("--strength",)),
        "tiling spiral": ([*gen, "--tiling", "spiral", "-o", out, *models], 2, ("--tiling", "spiral")),
        "stride without overlap": ([*gen, "--tile-stride", "8", "-o", out, *models], 2, ("--tile-stride", "overlap")),
        "shift without fstd": ([*gen, "--tiling", "naive", "--tile-shift", "both", "-o", out, *models], 2,
                               ("--tile-shift", "fstd")),
        "edges without fstd": ([*gen, "--tiling", "overlap", "--tile-edges", "clamp", "-o", out, *models], 2,
                               ("--tile-edges", "fstd")),
        "last step without fstd": ([*gen, "--tiling", "naive", "--tile-last-step", "single", "-o", out, *models], 2,
                                   ("--tile-last-step", "fstd")),
        "stride above the tile": ([*gen, "--tiling", "overlap", "--tile-size", "8", "--tile-stride", "9", "-o", out,
                                   *models], 2, ("stride=9",)),
        "missing model path": ([*gen, "-o", out, "--base", str(tmp / "nope")], 1, ("nope", "no such file")),
        "ckpt without --allow-pickle": ([*gen, "-o", out, "--base", str(tmp / "dummy.ckpt")], 1,
                                        ("dummy.ckpt", "--allow-pickle")),
        "output .gif": ([*gen, "-o", str(tmp / "out.gif"), *models], 2, ("out.gif", "unknown format")),
        "output dir missing": ([*gen, "-o", str(tmp / "no" / "out.png"), *models], 2, ("does not exist",)),
        "output is a directory": ([*gen, "-o", str(tmp / "adir.png"), *models], 2, ("is a directory",)),
        "default model not shipped": ([*gen, "-o", out], 1, ("default model", "--base")),
        "img2img without base": ([*gen, "-o", out, "--img2img"], 2, ("--img2img", "--base")),
        "upscaler without base": ([*gen, "-o", out, "--upscaler", upscaler], 2, ("--upscaler", "--base")),
        "bad device": ([*gen, "-o", out, "--device", "warp9", *models], 2, ("--device", "warp9")),
        "unknown option": ([*gen, "-o", out, "--colour", "red", *models], 2, ("unrecognized", "--colour")),
        "missing -o": ([*gen, *models], 2, ("-o/--output",)),
        "upscale a text file": (["upscale", str(tmp / "notes.txt"), "--size", "64x64", "-o", out, *models], 2,
                                ("notes.txt", "not an image")),
        "upscale a missing file": (["upscale", str(tmp / "gone.png"), "--size", "64x64", "-o", out, *models], 2,
                                   ("gone.png", "no such file")),
    }


BAD_NAMES = [
    "steps 0", "upscale steps 0", "tile size 4", "negative guidance", "strength 0", "tiling spiral",
    "stride without overlap", "shift without fstd", "edges without fstd", "last step without fstd",
    "stride above the tile",
    "missing model path", "ckpt without --allow-pickle", "output .gif", "output dir missing",
    "output is a directory", "default model not shipped", "img2img without base", "upscaler without base",
    "bad device", "unknown option", "missing -o", "upscale a text file", "upscale a missing file",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_fails_with_one_line_and_no_file(capsys, tmp_path, monkeypatch, model_dirs, name):
    from anysize import models as model_loading

    monkeypatch.setattr(model_loading, "DEFAULT_MODEL_DIR", tmp_path / "no_default_model")
    argv, expected_code, words = _bad_cases(tmp_path, *map(str, model_dirs))[name]
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run(capsys, *argv)
    assert_one_error(code, err, expected_code, *words)
    assert out == ""
    assert sorted(tmp_path.rglob("*")) == before


def test_bad_case_names_cover_every_case(tmp_path, model_dirs):
    assert sorted(_bad_cases(tmp_path, *map(str, model_dirs))) == sorted(BAD_NAMES)


# ---------------------------------------------------------------------- runtime failures: no file
def test_memory_preflight_refusal(capsys, tmp_path, monkeypatch, models):
    from anysize import memory

    monkeypatch.setattr(memory, "available_bytes", lambda on_accelerator: (0, 1024))
    code, _, err = run(capsys, "generate", "x", "--size", "96x64", "-o", tmp_path / "o.png", *FAST, *models)
    assert_one_error(code, err, 1, "96x64", "GiB")
    assert list(tmp_path.iterdir()) == []


def test_memory_plan_is_printed_and_kept(capsys, tmp_path, models):
    out = tmp_path / "o.png"
    code, _, err = run(capsys, "generate", "x", "--size", "96x64", "-o", out, "--tile-batch", "2", "--vae-tile", "16",
                       *FAST, *models)
    assert code == 0, err
    assert "memory plan: budget" in err and "tile batch 2, VAE tile 16" in err and "peak" in err
    metadata = read_metadata(out)
    assert (metadata["tile_batch_size"], metadata["vae_tile_size"]) == (2, 16)
    code, _, err = run(capsys, "generate", "x", "--size", "96x64", "-o", tmp_path / "p.png", "--max-memory", "1MiB",
                       *FAST, *models)
    assert_one_error(code, err, 1, "96x64", "max_memory=0.001 GiB", "lower the size")
    code, _, err = run(capsys, "generate", "x", "--size", "96x64", "-o", tmp_path / "p.png", "--max-memory", "lots",
                       *FAST, *models)
    assert_one_error(code, err, 2, "--max-memory", "8GiB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


def test_latent_memory_sends_sampling_to_disk_with_the_same_pixels(capsys, tmp_path, models):
    """--latent-memory 0: every stage-2 pass samples by bands on disk; same image, no scratch left."""
    for name, extra in (("mem.png", []), ("disk.png", ["--latent-memory", "0"])):
        code, _, err = run(capsys, "generate", "x", "--size", "200x120", "-o", tmp_path / name, *FAST, *models, *extra)
        assert code == 0, err
    assert "state on disk in bands" in err
    with PIL.Image.open(tmp_path / "mem.png") as a, PIL.Image.open(tmp_path / "disk.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    code, _, err = run(capsys, "generate", "x", "--size", "96x64", "-o", tmp_path / "p.png", "--latent-memory", "-1",
                       *FAST, *models)
    assert_one_error(code, err, 2, "--latent-memory", "512MiB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.png", "mem.png"]


def test_interrupt_exits_130_without_a_file(capsys, tmp_path, monkeypatch, models):
    from anysize.pipeline import AnySizePipeline

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AnySizePipeline, "run", interrupted)  # the CLI plans, then runs the plan
    code, _, err = run(capsys, "generate", "x", "--size", "96x64", "-o", tmp_path / "o.png", "--quiet", *FAST, *models)
    assert_one_error(code, err, 130, "interrupted")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_file(capsys, tmp_path, monkeypatch, models):
    def encoder(im, fp, filename):
        fp.write(b"partial")
        raise OSError("No space left on device (simulated)")

    monkeypatch.setitem(PIL.Image.SAVE, "PNG", encoder)
    code, _, err = run(capsys, "generate", "x", "--size", "96x64", "-o", tmp_path / "o.png", "--quiet", *FAST, *models)
    assert_one_error(code, err, 1, "No space left")
    assert list(tmp_path.iterdir()) == []


def test_unexpected_error_is_one_line_with_its_type(capsys, tmp_path, monkeypatch, models):
    from anysize.pipeline import AnySizePipeline

    def broken(self, *args, **kwargs):
        raise KeyError("boom\nsecond line")

    monkeypatch.setattr(AnySizePipeline, "run", broken)
    monkeypatch.delenv("ANYSIZE_DEBUG", raising=False)
    code, _, err = run(capsys, "generate", "x", "--size", "96x64", "-o", tmp_path / "o.png", "--quiet", *FAST, *models)
    assert_one_error(code, err, 1, "KeyError", "boom")
    monkeypatch.setenv("ANYSIZE_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["generate", "x", "--size", "96x64", "-o", str(tmp_path / "o.png"), "--quiet", *FAST, *models])


def test_from_image_runs_the_stored_command_again(model_dirs, tmp_path, capsys, monkeypatch):
    """The PNG's metadata holds the command line (seed made explicit, paths made absolute): replayed
    from another directory it gives the same pixels; later options replace the stored ones."""
    main = cli.main
    monkeypatch.chdir(tmp_path)
    first = ["generate", "a red circle", "--size", "128x96", "-o", "first.png", "--base", str(model_dirs[0]),
             "--img2img", "--steps", "2", "--upscale-steps", "2", "--quiet"]  # no --seed: a random one, stored
    assert main(first) == 0, capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["generate", "--from-image", str(tmp_path / "first.png"), "-o", "again.png", "--quiet"]) == 0
    with PIL.Image.open(tmp_path / "first.png") as a, PIL.Image.open(elsewhere / "again.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert main(["generate", "--from-image", str(tmp_path / "first.png"), "-o", "other.png", "--seed", "99",
                 "--quiet"]) == 0
    with PIL.Image.open(tmp_path / "first.png") as a, PIL.Image.open(elsewhere / "other.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    PIL.Image.new("RGB", (8, 8)).save(elsewhere / "plain.png")
    capsys.readouterr()
    assert main(["generate", "--from-image", "plain.png", "-o", "x.png"]) == 2
    assert "holds no anysize command line" in capsys.readouterr().err
    assert main(["upscale", "--from-image", str(tmp_path / "first.png"), "-o", "x.png"]) == 2
    assert "was made by 'anysize generate', not 'upscale'" in capsys.readouterr().err


def test_upscale_takes_guidance_negative_prompt_and_noise_level(model_dirs, tmp_path, capsys):
    src = tmp_path / "src.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8)).save(src)
    out = tmp_path / "big.png"
    code = cli.main(["upscale", str(src), "--size", "128x96", "-o", str(out), "--upscaler", str(model_dirs[1]),
                     "--steps", "2", "--guidance", "2.5", "--negative", "blurry", "--noise-level", "40", "--quiet"])
    assert code == 0, capsys.readouterr().err
    request = read_metadata(out)["request"]
    assert (request["guidance_scale"], request["negative_prompt"], request["noise_level"]) == (2.5, "blurry", 40)
    code = cli.main(["upscale", str(src), "--size", "128x96", "-o", str(out), "--upscaler", str(model_dirs[1]),
                     "--noise-level", "999"])
    assert code != 0 and "noise_level=999: must be <= the upscaler's max_noise_level 350" in capsys.readouterr().err


def test_count_makes_numbered_files_with_consecutive_seeds(model_dirs, tmp_path, capsys, monkeypatch):
    """--count 3 --seed 5: OUT-0001..3 with seeds 5, 6, 7; the second equals a single run at seed 6,
    and --from-image of it makes that one image again."""
    monkeypatch.chdir(tmp_path)
    base = ["generate", "a red circle", "--size", "128x96", "--base", str(model_dirs[0]), "--img2img", "--steps",
            "2", "--upscale-steps", "2", "--quiet"]
    assert cli.main([*base, "-o", "b.png", "--seed", "5", "--count", "3"]) == 0, capsys.readouterr().err
    files = sorted(tmp_path.glob("b-*.png"))
    assert [f.name for f in files] == ["b-0001.png", "b-0002.png", "b-0003.png"] and not (tmp_path / "b.png").exists()
    assert [read_metadata(f)["seed"] for f in files] == [5, 6, 7]
    assert cli.main([*base, "-o", "single.png", "--seed", "6"]) == 0
    assert cli.main(["generate", "--from-image", "b-0002.png", "-o", "again.png", "--quiet"]) == 0
    pixels = [np.asarray(PIL.Image.open(tmp_path / n)) for n in ("b-0002.png", "single.png", "again.png")]
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])
    assert not np.array_equal(pixels[0], np.asarray(PIL.Image.open(files[0])))
    assert not list(tmp_path.glob("again-*.png"))
