# Every target builds what it needs from nothing: a fresh clone runs `make test` or `make bench` directly.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Batch-invariant MKL GEMM on CPU, so results do not depend on tile_batch_size (see README, Determinism).
export MKL_CBWR ?= AVX2,STRICT

.PHONY: venv test bench clean

$(BIN)/activate: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(BIN)/activate

venv: $(BIN)/activate

test: venv
	$(BIN)/python -m pytest

# A quick tiling benchmark (2048^2 px); the README's tables name their full commands.
bench: venv
	$(BIN)/python benchmarks/tiling.py --size 2048 --steps 2

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
