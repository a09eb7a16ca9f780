"""How much of a scene survives a VAE: render, encode (posterior mean), decode, score.

For each VAE and size, the same N scenes (seeds 10000.., laid out for the size's ratio, as
``benchmarks/composition.py`` draws them) are rendered exactly, passed through the VAE and scored by
``anysize.train.evaluate`` (exact match of the object multiset) and by PSNR against the render. The clean
render scores 1.00 exact at every size here, so whatever is lost is the VAE's. This is the ceiling the
base model's composition is read against: at the ARAD buckets' 48-px shorter side a small object is
about 12 px, 3 latent pixels.

    .venv/bin/python benchmarks/vae_round_trip.py runs/vae/model runs/vae-decoder/model \\
        --json benchmarks/results/vae_round_trip.json
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import numpy as np  # noqa: E402

from anysize.train.evaluate import aggregate, evaluate_image  # noqa: E402
from anysize.train.scenes import render, sample_scene  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from composition import load_vae, vae_round_trip, write_json  # noqa: E402

SIZES = ("64x64", "96x48", "48x96", "128x64", "128x128")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / mse)


def run(args) -> dict:
    results: dict = {"config": dict(vars(args)), "vaes": {}}
    for path in args.vaes:
        vae = load_vae(path)
        rows = {}
        for size in args.sizes:
            w, h = (int(v) for v in size.split("x"))
            scenes = [sample_scene(10_000 + i, h / w) for i in range(args.scenes)]
            clean = np.stack([render(s, w, h) for s in scenes])
            out = vae_round_trip(vae, clean)
            rows[size] = {
                "clean_exact": aggregate([evaluate_image(i, s) for i, s in zip(clean, scenes)])["exact"],
                "exact": aggregate([evaluate_image(i, s) for i, s in zip(out, scenes)])["exact"],
                "psnr": psnr(clean, out),
            }
            print(f"{path} {size}: exact {rows[size]['exact']:.2f} (clean {rows[size]['clean_exact']:.2f}), "
                  f"PSNR {rows[size]['psnr']:.2f} dB", file=sys.stderr, flush=True)
        results["vaes"][path] = rows
    return results


def table(results: dict) -> str:
    sizes = list(next(iter(results["vaes"].values())))
    lines = ["| VAE | " + " | ".join(f"{s} exact / PSNR" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for path, rows in results["vaes"].items():
        lines.append(f"| `{path}` | " + " | ".join(f"{rows[s]['exact']:.2f} / {rows[s]['psnr']:.2f}" for s in sizes) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("vaes", nargs="+", help="VAE directories (a diffusers model directory with vae/, or the vae/ itself)")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), help="WxH sizes (default: %(default)s)")
    p.add_argument("--scenes", type=int, default=100)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = run(args)
    print(table(results))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
