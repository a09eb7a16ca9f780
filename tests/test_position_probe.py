"""benchmarks/position_probe.py's regression: it finds position that is there and none that is not."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "position_probe.py"
_spec = importlib.util.spec_from_file_location("position_probe", _PATH)
pp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pp)


def test_token_centres_are_row_major():
    c = pp.token_centres(2)
    assert c.tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]


def test_position_fit_reads_a_linear_code_and_not_noise():
    rng = np.random.default_rng(0)
    n, side, channels = 20, 6, 16
    centres = pp.token_centres(side)
    mix = rng.normal(size=(2, channels))
    coded = np.stack([centres @ mix + 0.01 * rng.normal(size=(side * side, channels)) for _ in range(n)])
    r2, err = pp.position_fit(coded, n_train=15)
    assert min(r2) > 0.99 and err < 0.01
    noise = rng.normal(size=(n, side * side, channels))
    r2, err = pp.position_fit(noise, n_train=15)
    assert max(r2) < 0.1 and err > 0.2  # a constant guess at the centre errs by 0.25 on average


def test_position_fit_checks_its_input():
    with pytest.raises(ValueError, match="square"):
        pp.position_fit(np.zeros((4, 10, 3)), n_train=2)
    with pytest.raises(ValueError, match="n_train"):
        pp.position_fit(np.zeros((4, 9, 3)), n_train=4)
