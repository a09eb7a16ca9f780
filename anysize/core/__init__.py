"""The tiled engine, usable without the pipeline: tile geometry (:mod:`.tiling`), the one sampling loop
over any denoiser and any diffusers scheduler (:mod:`.sampler`), sampling by bands of rows on disk
(:mod:`.bands`), the tiled VAE (:mod:`.vae`), resumable sampling phases (:mod:`.checkpoint`) and tile
parallelism under torchrun (:mod:`.distributed`). Nothing here imports the pipeline, the CLI or the
request; the arrows point into this package only."""
