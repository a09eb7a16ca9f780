"""A model directory's anysize.json (anysize.models.ModelSettings): stage-2 steps when a call gives none,
and a model trained without text getting the empty prompt. Plus the back-projection colour fix through
the pipeline (each pass's output averages back down to its input)."""

import json
import shutil

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
import torch

from anysize import AnySizePipeline
from anysize.io.backproject import area_reduce
from anysize.models import ModelLoadError, ModelSettings, read_settings


@pytest.fixture(scope="module")
def text_free(model_dirs, tmp_path_factory):
    """The tiny upscaler with an anysize.json: 3 steps by default, trained without text."""
    path = tmp_path_factory.mktemp("settings") / "upscaler"
    shutil.copytree(model_dirs[1], path)
    (path / "anysize.json").write_text(json.dumps({"upscale_inference_steps": 3, "text": False}))
    return AnySizePipeline.from_pretrained(base=model_dirs[0], upscaler=path, device="cpu")


def test_no_file_means_the_defaults(model_dirs, pipe):
    from anysize.request import Request

    assert read_settings(model_dirs[1]) == ModelSettings()
    assert pipe.default_upscale_steps == 20
    assert pipe.plan_run(Request(width=256, height=128)).request.upscale_inference_steps == 20


def test_the_file_sets_the_steps_and_an_explicit_value_wins(text_free):
    from anysize.request import Request

    assert text_free.default_upscale_steps == 3
    assert text_free.plan_run(Request(width=256, height=128)).request.upscale_inference_steps == 3
    plan = text_free.plan_run(Request(width=256, height=128, upscale_inference_steps=5))
    assert plan.request.upscale_inference_steps == 5
    assert all(p.steps == 5 for p in plan.phases if p.kind == "sr")


def test_a_text_free_upscaler_ignores_the_prompt(text_free):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    kw = dict(num_inference_steps=2, generator=None, tile_size=16)
    outs = [np.asarray(text_free.upscale(image, 128, 128, prompt, **{**kw, "generator": torch.Generator().manual_seed(0)})
                       .images[0]) for prompt in ("", "a red square", "")]
    np.testing.assert_array_equal(outs[0], outs[2])  # reproducible, so the next comparison means something
    np.testing.assert_array_equal(outs[0], outs[1])


def test_an_upscaler_with_text_reads_the_prompt(pipe):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    outs = [np.asarray(pipe.upscale(image, 128, 128, prompt, num_inference_steps=2, tile_size=16,
                                    generator=torch.Generator().manual_seed(0)).images[0])
            for prompt in ("", "a red square")]
    assert np.abs(outs[0].astype(int) - outs[1].astype(int)).max() > 0


@pytest.mark.parametrize("content,message", [
    ("{", "not readable JSON"),
    ('{"steps": 3}', "only text, upscale_inference_steps"),
    ('{"upscale_inference_steps": 0}', "must be an integer >= 1"),
    ('{"upscale_inference_steps": true}', "must be an integer >= 1"),
    ('{"text": "no"}', "must be true or false"),
    ("[1]", "must be an object"),
])
def test_a_bad_settings_file_gets_one_line(tmp_path, content, message):
    (tmp_path / "anysize.json").write_text(content)
    with pytest.raises(ModelLoadError, match=message) as info:
        read_settings(tmp_path)
    assert "\n" not in str(info.value)


def test_the_cli_records_the_resolved_steps(text_free, tmp_path, monkeypatch):
    from anysize import cli

    monkeypatch.setattr(cli, "_load", lambda args: text_free)
    out = tmp_path / "x.png"
    assert cli.main(["generate", "a red square", "--size", "256x128", "--steps", "2", "--seed", "1",
                     "-o", str(out), "--quiet"]) == 0
    meta = json.loads(PIL.Image.open(out).text["anysize"])
    assert meta["upscale_steps"] == 3 and meta["request"]["upscale_inference_steps"] == 3


def _down(x: np.ndarray, size) -> np.ndarray:
    w, h = size
    H, W = x.shape[:2]
    return area_reduce(area_reduce(x.astype(np.float64), 1, np.arange(w + 1) * (W / w)), 0,
                       np.arange(h + 1) * (H / h))


@pytest.mark.parametrize("source,size", [((64, 32), (256, 128)), ((64, 32), (240, 120)), ((16, 16), (256, 256))])
def test_backproject_makes_the_output_average_down_to_the_input(pipe, source, size):
    """The default colour fix, through upscale(): one x4 pass, one pass at a ratio that is not whole,
    and two passes (each consistent with its input, so the whole is with the first). Random weights:
    the raw output has nothing to do with the input, which is the hardest case for the fix."""
    noise = np.random.default_rng(1).integers(0, 256, (*source[::-1], 3), dtype=np.uint8)
    image = PIL.Image.fromarray(noise).filter(PIL.ImageFilter.GaussianBlur(1))

    def run(color_fix):
        out = pipe.upscale(image, *size, num_inference_steps=2, tile_size=16, color_fix=color_fix,
                           generator=torch.Generator().manual_seed(0))
        assert out.images[0].size == size
        return np.abs(_down(np.asarray(out.images[0]), source) - np.asarray(image, np.float64)).mean()

    fixed, plain = run("backproject"), run("none")
    assert plain > 15 and fixed < 0.25 * plain, (fixed, plain)
