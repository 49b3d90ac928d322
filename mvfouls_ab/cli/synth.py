"""Generate a synthetic MVFouls data set: `python -m mvfouls_ab.synth --out DIR [--scale S] [--seed N]`.

Writes Train/ Valid/ Test/ Chall/ in the real layout (see mvfouls_ab/data/synthetic.py for what the videos show).
"""
from __future__ import annotations

import argparse
import json
import time

from ..data.synthetic import DEFAULT_SCALE, DEFAULT_SEED, MIN_PER_CLASS, generate
from ..errors import MVFoulsError
from . import HelpFormatter, fail, script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvfouls_ab.synth", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                        help=f"fraction of the real data set's size (default {DEFAULT_SCALE}; 1.0 = real counts)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"generator seed (default {DEFAULT_SEED})")
    parser.add_argument("--workers", type=int, default=2, help="encoding processes (default 2)")
    parser.add_argument("--min-per-class", type=int, default=MIN_PER_CLASS,
                        help=f"least actions per class in every labelled split (default {MIN_PER_CLASS})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        root = generate(args.out, scale=args.scale, seed=args.seed, workers=args.workers,
                        min_per_class=args.min_per_class, progress=True)
    except MVFoulsError as exc:
        return fail(exc)
    info = json.loads((root / "synthetic.json").read_text())
    print(f"wrote {root}: {info['actions']} actions, {info['clips']} clips in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    script(main)
