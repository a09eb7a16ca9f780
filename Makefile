# Every target builds what it needs from nothing: a fresh clone runs `make test` or `make bench` directly.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Batch-invariant MKL GEMM on CPU, so results do not depend on tile_batch_size (see README, Determinism).
export MKL_CBWR ?= AVX2,STRICT

.PHONY: venv browser test bench demo train-default train-default-cpu clean

$(BIN)/activate: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(BIN)/activate

venv: $(BIN)/activate

# tests/test_view.py screenshots the viewer in Debian's headless chromium: install it when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: venv browser
	$(BIN)/python -m pytest

# A quick tiling benchmark (2048^2 px); docs/benchmarks.md names each table's full command.
bench: venv
	$(BIN)/python benchmarks/tiling.py --size 2048 --steps 2

# The Quickstart's first command: one image from the embedded default model (CPU, offline).
demo: venv
	$(BIN)/anysize generate "two large red circles and a small blue triangle on grass" --size 768x384 --seed 3 --guidance 4 --upscale-guidance 1 -o demo.png

# Reproduces anysize/default_model from nothing: the VAE on the CPU (2 cores: ~55 min), then the base,
# the square baseline and the upscaler side by side on one GPU (H100: ~16 min of training; they run on
# a CPU too, but for about a day). Run again to resume after a stop. The step counts are the shipped
# model's; see docs/model_card.md.
# The decoder fine-tune (CPU, ~30 min) keeps the encoder, so it can run before or after the GPU step.
# The base is then fine-tuned from 64^2- to 80^2-px buckets on the CPU (~55 min): at 2:1 the 64^2
# buckets' 48 px shorter side was too small for this VAE to keep small shapes.
VAE_STEPS ?= 1750
DECODER_STEPS ?= 4500
GPU_BASE_STEPS ?= 3479
GPU_UPSCALER_STEPS ?= 4306
BASE80_STEPS ?= 2577
# The upscaler is then fine-tuned on the CPU (~40 min) for one-step sampling: half of each batch at the
# last timestep, where one step evaluates it.
UPSCALER_FT_STEPS ?= 2000
# Then the ControlNet (object silhouettes) of the shipped base, on the CPU (~50 min).
CONTROLNET_STEPS ?= 2382
train-default: venv
	$(BIN)/anysize train vae -o runs/vae --steps $(VAE_STEPS) --batch-size 32
	$(BIN)/anysize train vae -o runs/vae-decoder --init runs/vae/model --decoder-only --resolution 48 --steps $(DECODER_STEPS) --lr 1e-4
	BASE_STEPS=$(GPU_BASE_STEPS) UP_STEPS=$(GPU_UPSCALER_STEPS) PY=$(BIN)/python tools/train_gpu.sh 600 runs/gpu runs/vae/model
	$(BIN)/anysize train base -o runs/base80 --init runs/gpu/base/model --resolution 80 --steps $(BASE80_STEPS) --lr 1e-4 --checkpoint-every 100
	$(BIN)/python tools/ship_default.py runs/base80/model runs/gpu/upscaler/model --vae runs/vae-decoder/model
	$(BIN)/anysize train upscaler -o runs/upscaler-1step --init anysize/default_model/upscaler --steps $(UPSCALER_FT_STEPS) \
		--batch-size 16 --lr 1e-4 --final-t-fraction 0.5 --checkpoint-every 250
	$(BIN)/python tools/ship_default.py runs/base80/model runs/upscaler-1step/model --vae runs/vae-decoder/model
	$(BIN)/anysize train controlnet -o runs/controlnet --init anysize/default_model/base --steps $(CONTROLNET_STEPS) \
		--checkpoint-every 200
	$(BIN)/python tools/ship_default.py --controlnet runs/controlnet/model

# A CPU-only recipe sized for 2 CPU cores (~2 h; batch 32 / 16): fewer steps, 64^2-px buckets, not the shipped weights (docs/model_card.md).
BASE_STEPS ?= 1500
UPSCALER_STEPS ?= 800
train-default-cpu: venv
	$(BIN)/anysize train vae -o runs/vae --steps $(VAE_STEPS) --batch-size 32
	$(BIN)/anysize train base -o runs/base --vae runs/vae/model --buckets arad --steps $(BASE_STEPS)
	$(BIN)/anysize train base -o runs/base-square --vae runs/vae/model --buckets square --steps $(BASE_STEPS)
	$(BIN)/anysize train upscaler -o runs/upscaler --vae runs/vae/model --steps $(UPSCALER_STEPS) --batch-size 16
	$(BIN)/python tools/ship_default.py runs/base/model runs/upscaler/model

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
