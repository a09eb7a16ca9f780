"""The pure parts of benchmarks/grounding.py: box IoU and which requested objects a detection answers."""

import importlib.util
import json
from pathlib import Path

import numpy as np

from anysize.train.evaluate import Detection
from anysize.train.scenes import render, render_mask, sample_scene

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "grounding.py"
_spec = importlib.util.spec_from_file_location("grounding_bench", _PATH)
gb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gb)


def test_box_iou():
    assert gb.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert gb.box_iou((0, 0, 10, 10), (0, 5, 10, 15)) == 50 / 150
    assert gb.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_in_box_needs_the_key_an_iou_of_one_half_and_one_detection_per_request():
    # a 100x100 frame: requested a red circle in rows/cols 10-30 and another at 60-80
    red = (("circle", "red"), (10, 10, 30, 30))
    other = (("circle", "red"), (60, 60, 80, 80))
    on = Detection("circle", "red", cx=0.2, cy=0.2, area=0.03, touches_border=False, r=0.1)  # the same box
    assert gb.in_box([red], [on], 100, 100) == 1
    assert gb.in_box([red, other], [on], 100, 100) == 1  # one detection answers one request
    assert gb.in_box([red], [Detection("square", "red", 0.2, 0.2, 0.03, False, r=0.1)], 100, 100) == 0
    # shifted by 8 px: IoU 12 * 20 / (800 - 240) = 0.43 < 0.5, though its centre is in the box
    assert gb.in_box([red], [Detection("circle", "red", 0.28, 0.2, 0.03, False, r=0.1)], 100, 100) == 0
    # twice the size, same centre: IoU 0.25
    assert gb.in_box([red], [Detection("circle", "red", 0.2, 0.2, 0.1, False, r=0.2)], 100, 100) == 0


def test_the_rendered_scenes_score_every_object_in_its_box():
    """The detector's ceiling: on the true render every object is found in its box at 4:1 and 1:2."""
    for i, (w, h) in enumerate([(256, 64), (64, 128)]):
        scene = sample_scene(40 + i, h / w)
        m = gb.measure(render(scene, w, h), scene, render_mask(scene, w, h))
        assert m["in_box"] == m["centred"] == m["objects"] == len(scene.objects) and m["exact"]
        assert m["iou"] > 0.8
    scene = sample_scene(40, 0.25)
    m = gb.measure(np.zeros((64, 256, 3), np.uint8), scene, render_mask(scene, 256, 64))
    assert m["in_box"] == 0 and m["iou"] == 0.0


def test_the_table_keeps_each_stage_one_mode_apart_and_shares_the_truth(tmp_path):
    def row(method, layout, in_box, mode=None):
        r = {"ratio": "4:1", "size": "256x64", "layout": layout, "method": method, "seconds": 1.0,
             "in_box": in_box, "centred": in_box, "objects": 2, "iou": 0.5, "exact": True}
        return {**r, "panorama": mode} if mode else r

    rows = [row("truth", 0, 2), row("truth", 1, 2), row("controlnet", 0, 0), row("controlnet", 1, 1),
            row("controlnet", 0, 2, "direct"), row("controlnet", 1, 2, "direct")]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gb.key(rows[2]) == ("4:1", "256x64", 0, "controlnet", "stretch")
    assert gb.key(rows[4]) == ("4:1", "256x64", 0, "controlnet", "direct")
    lines = [line for line in gb.table(path).splitlines() if line.startswith("| 4:1")]
    # in box: truth 4/4 both times; the ControlNet 1/4 stretched, 4/4 direct; stretch first
    assert lines[0].startswith("| 4:1 | 256x64 | stretch | 2 | 4 | 100% | 25% |")
    assert lines[1].startswith("| 4:1 | 256x64 | direct | 2 | 4 | 100% | 100% |")
