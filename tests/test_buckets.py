"""Aspect-ratio buckets: the paper's nine ratios, kohya-style generation, nearest by |log ratio|."""

import math

import pytest

from anysize.buckets import (ARAD_RATIOS, BEYOND_BUCKETS, BucketChoice, arad_buckets, choose_base_size, kohya_buckets,
                             nearest_bucket, stretch_factor)


@pytest.mark.parametrize("area, step", [(512 * 512, 64), (768 * 768, 64), (1024 * 1024, 64), (64 * 64, 16)])
def test_arad_buckets_keep_area_ratio_and_granularity(area, step):
    buckets = arad_buckets(area, step)
    assert len(buckets) == 9 if step == 64 else len(buckets) >= 5
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert abs(w * h / area - 1) <= 0.25
    ratios = [h / w for w, h in buckets]
    assert ratios == sorted(ratios) and min(ratios) <= 0.55 and max(ratios) >= 1.8


def test_sd15_buckets_match_the_paper_ratios():
    buckets = arad_buckets(512 * 512, 64)
    for r, (w, h) in zip(ARAD_RATIOS, buckets):
        assert abs(math.log((h / w) / r)) < 0.12, (r, w, h)
    assert (512, 512) in buckets


def test_nearest_bucket_by_log_ratio():
    buckets = arad_buckets(512 * 512, 64)
    assert nearest_bucket(1920, 1080, buckets) == min(buckets, key=lambda b: abs(math.log(b[1] / b[0] / (1080 / 1920))))
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    w, h = nearest_bucket(1080, 1920, buckets)
    assert h > w


def test_kohya_buckets_fit_area_and_bounds():
    buckets = kohya_buckets(256, 1024, 64, 512 * 512)
    assert all(256 <= s <= 1024 and s % 64 == 0 for b in buckets for s in b)
    assert all(w * h <= 512 * 512 for w, h in buckets)
    assert (512, 512) in buckets and (1024, 256) in buckets and (256, 1024) in buckets


def test_choose_base_size_panorama_outside_range_only():
    buckets = arad_buckets(512 * 512, 64)
    for beyond in BEYOND_BUCKETS:
        assert choose_base_size(1920, 1080, buckets, beyond=beyond) == BucketChoice(704, 384, panorama=False)
    wide = choose_base_size(4096, 1024, buckets, beyond="direct")  # 4:1 is past the widest bucket (2:1)
    assert wide.panorama and not wide.tiled and wide.width > 2 * wide.height and wide.height % 64 == 0
    tall = choose_base_size(1000, 3000, buckets, beyond="tiled")
    assert tall.panorama and tall.tiled and tall.height >= 2.5 * tall.width
    thin = choose_base_size(32, 2048, buckets, beyond="direct")  # never larger than the request needs
    assert thin.panorama and thin.height <= 2048 and thin.width == 64
    coarse = arad_buckets(64 * 64, 16)  # coarse buckets: a ratio between two buckets is no panorama
    assert not choose_base_size(200, 150, coarse, beyond="direct").panorama


def test_choose_base_size_stretches_the_nearest_bucket_by_default():
    buckets = arad_buckets(512 * 512, 64)
    wide = choose_base_size(4096, 1024, buckets)
    assert wide == BucketChoice(*max(buckets, key=lambda b: b[0] / b[1]), panorama=False)
    assert stretch_factor(wide.size, 4096, 1024) == pytest.approx(4 / (wide.width / wide.height))
    assert stretch_factor((704, 352), 1408, 704) == 1.0 and stretch_factor((352, 704), 704, 2816) == pytest.approx(2)
    with pytest.raises(ValueError, match="beyond='crop'"):
        choose_base_size(4096, 1024, buckets, beyond="crop")


@pytest.mark.parametrize("call, msg", [(lambda: arad_buckets(0), "area=0"), (lambda: nearest_bucket(0, 5, [(1, 1)]), "width=0"),
                                        (lambda: kohya_buckets(512, 256), "min_side=512"), (lambda: nearest_bucket(5, 5, []), "buckets")])
def test_bucket_errors_name_the_argument(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def test_a_models_own_buckets_and_sdxls_by_default(pipe, tmp_path):
    import tiny_models
    from diffusers import StableDiffusionXLPipeline

    from anysize import AnySizePipeline
    from anysize.buckets import SDXL_BUCKETS, check_buckets, parse_buckets

    own = AnySizePipeline(pipe.base, None, buckets=[(64, 32), (32, 64), (48, 48)])
    assert own.plan(1000, 480).base == (64, 32) and own.plan(300, 700).base == (32, 64)
    assert parse_buckets("1024x1024, 1216X832") == [(1024, 1024), (1216, 832)]
    with pytest.raises(ValueError, match="bucket '12x'"):
        parse_buckets("64x64,12x")
    with pytest.raises(ValueError, match="multiples of 4 px"):
        check_buckets([(64, 30)], 4)
    with pytest.raises(ValueError, match="empty"):
        check_buckets([], 4)
    sdxl = StableDiffusionXLPipeline.from_pretrained(tiny_models.make_sdxl(tmp_path / "sdxl"))
    assert AnySizePipeline(sdxl).buckets != check_buckets(SDXL_BUCKETS, 4)  # native 64 px: ARAD's ratios
    sdxl.unet.register_to_config(sample_size=512)  # native 1024^2, as SDXL's own
    assert AnySizePipeline(sdxl).buckets == check_buckets(SDXL_BUCKETS, 4)
    assert AnySizePipeline(sdxl).plan(1920, 1080).base == (1344, 768)


def test_cli_refuses_bad_buckets(capsys):
    from anysize import cli

    assert cli.main(["generate", "x", "--size", "64x64", "-o", "x.png", "--buckets", "64x64,0x3"]) == 2
    assert "bucket '0x3'" in capsys.readouterr().err
