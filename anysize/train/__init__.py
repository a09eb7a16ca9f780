"""Training (:mod:`.trainer`: ARAD-bucketed VAE, base and x4-upscaler training), the procedural scene
domain it trains on (:mod:`.scenes`) and the evaluation that measures against that domain's exact truth
(:mod:`.evaluate`)."""

from importlib import import_module

_EXPORTS = {"TrainConfig": "trainer", "train": "trainer"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # lazy, so ``anysize.train.scenes`` imports without torch
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'anysize.train' has no attribute {name!r}")
