"""One Request, one RunPlan: validation, JSON, the plan's phases, hooks, TilingConfig, re-entrant calls."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from anysize import Request, TilingConfig
from anysize.plan import RunPlan

FAST = dict(num_inference_steps=2, upscale_inference_steps=2)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_json_round_trip_keeps_every_field():
    request = Request(["a", "b"], 300, 77, negative_prompt="blur", tiling=TilingConfig(method="overlap", stride=8),
                      tile_batch_size=3, max_memory=2**30, output_metadata={"k": 1}, source_size=None)
    data = json.loads(json.dumps(request.to_json()))
    assert Request.from_json(data) == request
    upscale = Request("x", 400, 300, call="upscale", num_inference_steps=None, source_size=(50, 40),
                      source_digest="ab", output_path="out.png")
    assert Request.from_json(json.loads(json.dumps(upscale.to_json()))) == upscale
    with pytest.raises(ValueError, match="unknown fields bogus"):
        Request.from_json({**upscale.to_json(), "bogus": 1})


def test_sampling_identity_ignores_what_changes_no_sampled_value():
    a = Request("x", 64, 64)
    same = dataclasses.replace(a, tile_batch_size=4, vae_tile_size=16, max_memory=2**30, output_type="np")
    assert a.sampling_identity() == same.sampling_identity()
    assert a.sampling_identity() != dataclasses.replace(a, tile_size=16).sampling_identity()


@pytest.mark.parametrize("fields, message", [
    (dict(call="paint"), "call='paint'"),
    (dict(tiling=TilingConfig(tile_size=16), tile_size=32), "tile_size=32: differs from the TilingConfig's"),
    (dict(tiling=TilingConfig(tile_batch_size=2), tile_batch_size=4), "tile_batch_size=4"),
    (dict(checkpoint_every=0), "checkpoint_every=0"),
    (dict(tile_batch_size=0), "tile_batch_size=0"), (dict(latent_memory=-1), "latent_memory=-1"),
    (dict(call="upscale", prompt=["a"]), "upscale takes one image"),
    (dict(call="upscale"), "source_size"),
    (dict(output_metadata={"a": 1}), "pass output_path too"),
    (dict(output_path="o.png", prompt=["a", "b"]), "writes one image"),
])
def test_validation_names_the_argument(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Request(**{"prompt": "x", "width": 64, "height": 64, **fields}).validate()


def test_the_plan_lists_every_phase_the_memory_planner_estimates(pipe):
    plan = pipe.plan_run(Request("x", 1024, 768, **FAST))
    assert isinstance(plan, RunPlan)
    names = [p.name for p in plan.phases]
    assert names == [s.name for s in plan.memory.stages]
    assert names[:2] == ["stage 1", "stage 1 decode"] and names[-1] == "output"
    assert [p.size for p in plan.phases if p.kind == "sr"] == list(plan.passes)
    # every sampling phase resolved its tile and carries the planner's tile batch; every decode its VAE tile
    assert all(p.tiling.tile_size and p.tiling.tile_batch_size == plan.memory.tile_batch_size for p in plan.sampling)
    assert {p.vae_tile_size for p in plan.phases if p.kind == "decode"} == {plan.memory.vae_tile_size}
    assert plan.phases[0].tiling.method == "none"  # stage 1 samples the bucket untiled
    latent = pipe.plan_run(Request("x", 1024, 768, output_type="latent", **FAST))
    assert latent.phases[-1].name == f"pass {len(latent.passes)}"


def test_plan_then_run_is_the_call(pipe):
    call = pipe("two red circles", width=150, height=70, generator=gen(3), output_type="np", **FAST).images[0]
    plan = pipe.plan_run(Request("two red circles", 150, 70, output_type="np", **FAST))
    np.testing.assert_array_equal(pipe.run(plan, generator=gen(3)).images[0], call)
    with pytest.raises(ValueError, match="needs its input image"):
        pipe.run(pipe.plan_run(Request("x", 128, 128, call="upscale", num_inference_steps=None,
                                       source_size=(32, 32))))


def test_hooks_see_each_phase_start_and_end_in_order(pipe):
    events = []

    class Recorder:
        def on_phase_start(self, phase):
            events.append(("start", phase.name))

        def on_phase_end(self, phase):
            events.append(("end", phase.name))

    only_end = type("OnlyEnd", (), {"on_phase_end": lambda self, phase: events.append(("also", phase.name))})()
    out = pipe("x", width=300, height=77, generator=gen(), hooks=[Recorder(), only_end], **FAST)
    names = [s.name for s in out.memory_plan.stages]
    expected = [e for n in names for e in (("start", n), ("end", n), ("also", n))]
    assert events == expected
    events.clear()

    def failing(owner, step, timestep, kwargs):
        if kwargs["stage"] == "upscale":
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        pipe("x", width=300, height=77, generator=gen(), hooks=Recorder(), callback_on_step_end=failing, **FAST)
    assert events[-2:] == [("start", "pass 1"), ("end", "pass 1")]  # the end hook runs when the phase fails


def test_tiling_takes_a_tiling_config(pipe):
    kw = dict(width=300, height=160, output_type="np", **FAST)
    by_name = pipe("x", tiling="fstd", tile_size=16, tile_batch_size=2, generator=gen(1), **kw).images[0]
    by_config = pipe("x", tiling=TilingConfig(method="fstd", tile_size=16), tile_batch_size=2, generator=gen(1),
                     **kw).images[0]
    np.testing.assert_array_equal(by_config, by_name)  # the same tiling said two ways: the same pixels
    both = pipe("x", tiling=TilingConfig(method="fstd", tile_size=16, shift="both"), generator=gen(1), **kw)
    plan = pipe.plan_run(Request("x", 300, 160, tiling=TilingConfig(shift="both"), **FAST))
    assert all(p.tiling.shift == "both" for p in plan.phases if p.kind == "sr")
    assert both.images[0].shape == (160, 300, 3)
    with pytest.raises(ValueError, match="differs from the TilingConfig"):
        pipe("x", tiling=TilingConfig(tile_size=16), tile_size=32, **kw)


def test_calls_are_reentrant_and_leave_no_state_on_the_pipeline(pipe):
    before = dict(vars(pipe))
    alone = pipe("a", width=300, height=77, generator=gen(5), output_type="np", **FAST).images[0]
    inner = []

    def nested(owner, step, timestep, kwargs):  # a call from inside another call's step
        if kwargs["stage"] == "upscale" and not inner:
            inner.append(owner("b", 64, 64, generator=gen(6), output_type="np", **FAST).images[0])
        return None

    outer = pipe("a", width=300, height=77, generator=gen(5), output_type="np", callback_on_step_end=nested, **FAST).images[0]
    assert inner and inner[0].shape == (64, 64, 3)
    np.testing.assert_array_equal(outer, alone)
    assert vars(pipe).keys() == before.keys() and all(vars(pipe)[k] is v for k, v in before.items())


def test_the_file_stores_its_request(pipe, tmp_path):
    from anysize.io.output import read_metadata

    path = tmp_path / "o.png"
    pipe("two red circles", width=150, height=70, generator=gen(2), output_path=path, output_metadata={"seed": 2}, **FAST)
    meta = read_metadata(path)
    request = Request.from_json(meta["request"])
    assert meta["seed"] == 2 and request.output_metadata is None
    assert request == Request("two red circles", 150, 70, output_path=str(path), **FAST)
