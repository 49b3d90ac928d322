"""Representation-stage cost: frame2d training samples/s (forward + backward) and embedding clips/s on this CPU.

A sample is one action of the stage: every view, at its window's middle frame (training/representation.py; 2.27
views per action on average in the real Train, `--views 2` by default), so a step of `rep_batch_size` actions runs
rep_batch_size x views frames through the CNN. Embedding a clip runs all of its
window's frames (3 by default). Prints, per frame size and width, the figures and what they mean for a data set:
the stage's minutes for 1,000 Train actions (and the real Train's 2,319) at `--epochs`, and embedding minutes per
1,000 clips. Random inputs: the cost does not depend on the pixels.

    python benchmarks/representation.py                          # the README figures
    python benchmarks/representation.py --sizes 144x256 --widths 16 32 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.models.backbones import build_backbone, normalize_clips


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(h: int, w: int, width: int, args: argparse.Namespace) -> tuple[float, float]:
    """(training samples/s, embedded clips/s) of frame2d at h x w with `width` channels."""
    net, dim = build_backbone("frame2d", cnn_width=width)
    head = torch.nn.Linear(dim, 12)
    opt = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=1e-3)
    frames = normalize_clips(torch.randint(0, 255, (args.batch * args.views, 3, 1, h, w), dtype=torch.uint8))
    frames = frames.squeeze(2)
    clips = normalize_clips(torch.randint(0, 255, (32, 3, args.frames, h, w), dtype=torch.uint8))

    def step() -> None:
        net.train()
        emb = net.frames(frames).view(args.batch, args.views, -1).amax(dim=1)
        loss = head(emb).logsumexp(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def embed() -> None:
        net.eval()
        with torch.inference_mode():
            net(clips)

    return args.batch / timed(step, args.repeats), 32 / timed(embed, max(2, args.repeats // 2))


def main(argv: list[str] | None = None) -> int:
    defaults = TrainingConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["144x256", "224x398"], help="HEIGHTxWIDTH (native: 224p release 224x398, synthetic 144x256)")
    p.add_argument("--widths", type=int, nargs="+", default=[16])
    p.add_argument("--batch", type=int, default=defaults.rep_batch_size, help="actions per step")
    p.add_argument("--views", type=int, default=2, help="views (frames) per action in a training step")
    p.add_argument("--frames", type=int, default=defaults.num_frames, help="frames per clip when embedding")
    p.add_argument("--epochs", type=int, default=defaults.rep_epochs)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; step = {args.batch} actions x {args.views} views "
          f"x 1 frame; embedding = {args.frames} frames per clip; stage = {args.epochs} epochs")
    print(f"{'size':>9} {'width':>5} {'train samples/s':>16} {'stage min /1k':>14} {'stage min 2,319':>16} "
          f"{'embed clips/s':>14} {'embed min /1k clips':>20}")
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        for width in args.widths:
            sps, cps = measure(h, w, width, args)
            print(f"{size:>9} {width:>5} {sps:>16.1f} {1000 * args.epochs / sps / 60:>14.1f} "
                  f"{2319 * args.epochs / sps / 60:>16.1f} {cps:>14.1f} {1000 / cps / 60:>20.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
