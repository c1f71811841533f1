"""Copy a sweep's figures into docs/img, small enough to commit.

    python docs/img/make.py [SWEEP_DIR] [--alpha ALPHA_DIR] [--stochastic STOCHASTIC_DIR] [--out docs/img]

SWEEP_DIR is a sweep that ``python -m analysis`` has charted (``make demo`` leaves the default
study's in ``multirun/latest``). Its ``figures/phase_diagram.png`` becomes the front page's picture
(``phase_diagram.png``, 1000 pixels wide) and every figure of ``figures/`` a thumbnail for the guide
(``thumb_NAME.png``, 560 pixels wide); with ``--alpha``, the alpha-family figures of that sweep
(``python -m kl_sweep -m experiment=alpha`` and its analysis) too; with ``--stochastic``, the
stochastic-VI figures of that sweep (the study of docs/stochastic-vi.md), 900 pixels wide. Images
are scaled with a Lanczos filter; the front picture keeps its colours, the others get a 256-colour
palette (octree, which keeps small areas such as legend swatches in their own colour).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

PICTURE = ("phase_diagram", 1000)
THUMBNAILS = ("phase_diagram", "bifurcation", "basin_map", "fit_overlays", "loss_landscape")
ALPHA_THUMBNAILS = ("alpha_phase_diagram", "alpha_folds", "alpha_fits")
THUMB_WIDTH = 560
STOCHASTIC = ("stochastic_map", "stochastic_shares", "stochastic_bias")
STOCHASTIC_WIDTH = 900


def shrink(source: Path, target: Path, width: int, palette: bool) -> Path:
    """``source`` scaled to ``width`` pixels wide (never enlarged) as a PNG at ``target``."""
    with Image.open(source) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        if palette:
            image = image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, optimize=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, nargs="?", help="a charted sweep, e.g. multirun/latest")
    parser.add_argument("--alpha", type=Path, help="a charted sweep with divergence=alpha rows")
    parser.add_argument("--stochastic", type=Path, help="a charted sweep with estimator.resample=true rows")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="default: docs/img")
    args = parser.parse_args(argv)
    wanted = []
    if args.sweep_dir is not None:
        wanted += [(args.sweep_dir, PICTURE[0], PICTURE[0], PICTURE[1])]
        wanted += [(args.sweep_dir, name, f"thumb_{name}", THUMB_WIDTH) for name in THUMBNAILS]
    if args.alpha is not None:
        wanted += [(args.alpha, name, f"thumb_{name}", THUMB_WIDTH) for name in ALPHA_THUMBNAILS]
    if args.stochastic is not None:
        wanted += [(args.stochastic, name, name, STOCHASTIC_WIDTH) for name in STOCHASTIC]
    missing = [
        str(d / "figures" / f"{n}.png") for d, n, _, _ in wanted if not (d / "figures" / f"{n}.png").is_file()
    ]
    if missing:
        print(
            f"make.py: no figure {', '.join(missing)}: run python -m analysis on the sweep first",
            file=sys.stderr,
        )
        return 2
    for sweep_dir, name, out_name, width in wanted:
        source = sweep_dir / "figures" / f"{name}.png"
        target = shrink(source, args.out / f"{out_name}.png", width, palette=out_name != PICTURE[0])
        print(f"{target} ({target.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
