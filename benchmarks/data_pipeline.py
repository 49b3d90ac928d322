"""Clips per second: PyAV decode of the frame window vs. reads from the clip cache (per-clip files and packs).

    python benchmarks/data_pipeline.py                 # synthetic default data set + a 398x224 real-size set
    python benchmarks/data_pipeline.py --data DIR      # also (or instead, with --no-synthetic) a real MVFouls root

Each source: decode `--clips` clips with `decode_clip` (one process, the baseline window 63..87 -> 16 x 112x112),
fill a fresh ClipCache with them (one .npy per clip), read them `--repeats` times through `ClipCache.get` + a copy
into memory (what MultiViewDataset does per view), then pack them (`ClipCache.pack`: one memory-mapped array, as
`DataBundle.warm` does per split) and read them the same way again. The 398x224 set is written here with
write_clip (126 frames, 25 fps, textured panning content with sensor noise, like broadcast video; libx264 preset
"medium", ffmpeg's default, as a release would be encoded; "ultrafast" clips decode ~20% faster) because the
synthetic generator writes small frames. Times are means per clip, wall clock and process CPU time (CPU time is
the steadier figure on a shared machine). Goal (issue 2): packed cached reads >= 100x decode.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from mvfouls_ab.data.annotations import Action, Clip, load_split
from mvfouls_ab.data.dataset import ClipCache
from mvfouls_ab.data.video import ClipWindow, decode_clip, write_clip


def broadcast_like(frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Textured pitch panning 1.5 px per frame, a moving blob, and a little sensor noise on every frame."""
    texture = rng.integers(0, 256, (height // 4 + 1, (width + 2 * frames) // 4 + 1, 3), dtype=np.uint8)
    texture = np.kron(texture, np.ones((4, 4, 1), np.uint8)).astype(np.int16) // 3 + np.array([40, 110, 40])
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        shift = int(1.5 * t)
        frame = texture[:height, shift:shift + width].copy()
        x, y = 40 + 2 * t, height // 2 + int(20 * np.sin(t / 10))
        frame[max(y - 12, 0):y + 12, x % (width - 24):x % (width - 24) + 24] = (220, 60, 60)
        frame += rng.integers(-6, 7, frame.shape, dtype=np.int16)
        video[t] = np.clip(frame, 0, 255)
    return video


def make_real_size_clips(out: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [write_clip(out / f"action_{i}" / "clip_0.mp4", broadcast_like(126, 224, 398, rng), preset="medium")
            for i in range(n)]


def clips_of(root: Path, split: str, n: int) -> list[Path]:
    actions = load_split(root, split).actions
    return [c.path for a in actions for c in a.clips][:n]


def timed_reads(cache: ClipCache, clips: list[Clip], window: ClipWindow, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds per clip of `repeats` passes of ClipCache.get + a copy into memory."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for clip in clips:
            np.array(cache.get(clip, window))  # memory-mapped read + copy into RAM
    return (time.perf_counter() - wall) / (repeats * len(clips)), (time.process_time() - cpu) / (repeats * len(clips))


def measure(name: str, paths: list[Path], window: ClipWindow, repeats: int) -> dict[str, float]:
    with av.open(str(paths[0])) as container:
        stream = container.streams.video[0]
        shape = f"{stream.width}x{stream.height}, {stream.frames} frames"
    decode_wall, decode_cpu = [], []
    for path in paths:
        wall, cpu = time.perf_counter(), time.process_time()
        decode_clip(path, window)
        decode_wall.append(time.perf_counter() - wall)
        decode_cpu.append(time.process_time() - cpu)
    decode_wall, decode_cpu = sum(decode_wall) / len(paths), sum(decode_cpu) / len(paths)
    with tempfile.TemporaryDirectory(prefix="mvfouls_bench_cache_") as tmp:
        cache = ClipCache(tmp)
        clips = [Clip("", p, "", None, None) for p in paths]
        for clip in clips:
            cache.get(clip, window)
        file_wall, file_cpu = timed_reads(cache, clips, window, repeats)
        start = time.perf_counter()
        cache.pack([Action(str(i), None, None, {}, (clip,)) for i, clip in enumerate(clips)], window)
        pack_wall = (time.perf_counter() - start) / len(clips)
        misses = cache.misses
        pack_read_wall, pack_read_cpu = timed_reads(cache, clips, window, repeats)
        assert cache.misses == misses, "the packed reads decoded clips"
    result = {"decode_clips_s": 1 / decode_wall, "cached_clips_s": 1 / file_wall, "ratio": decode_wall / file_wall,
              "ratio_cpu": decode_cpu / file_cpu, "packed_clips_s": 1 / pack_read_wall,
              "packed_ratio": decode_wall / pack_read_wall, "packed_ratio_cpu": decode_cpu / pack_read_cpu}
    print(f"\n{name}: {len(paths)} clips ({shape}); window frames {window.start}..{window.end} -> "
          f"{window.num_frames} x {window.size}x{window.size}")
    print(f"  PyAV decode          {1 / decode_wall:10.1f} clips/s  ({decode_wall * 1e3:8.3f} ms/clip wall, "
          f"{decode_cpu * 1e3:8.3f} ms CPU)")
    print(f"  per-clip file read   {1 / file_wall:10.1f} clips/s  ({file_wall * 1e3:8.3f} ms/clip wall, "
          f"{file_cpu * 1e3:8.3f} ms CPU; {repeats} passes)")
    print(f"  packed read          {1 / pack_read_wall:10.1f} clips/s  ({pack_read_wall * 1e3:8.3f} ms/clip wall, "
          f"{pack_read_cpu * 1e3:8.3f} ms CPU; {repeats} passes; packing took {pack_wall * 1e3:.3f} ms/clip once)")
    print(f"  ratio file/decode    {result['ratio']:10.0f}x wall, {result['ratio_cpu']:.0f}x CPU")
    verdict = "met" if result["packed_ratio"] >= 100 else "NOT met"
    print(f"  ratio packed/decode  {result['packed_ratio']:10.0f}x wall, {result['packed_ratio_cpu']:.0f}x CPU  "
          f"(goal >= 100x: {verdict})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=40, help="clips per source")
    parser.add_argument("--repeats", type=int, default=20, help="passes over the cached clips")
    parser.add_argument("--size", type=int, default=112, help="frame size of the window")
    parser.add_argument("--data", type=Path, help="an MVFouls root (real or synthetic) to measure too")
    parser.add_argument("--split", default="Train")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the default synthetic data set")
    parser.add_argument("--no-real-size", action="store_true", help="skip the 398x224 clips written here")
    args = parser.parse_args()
    window = ClipWindow(size=args.size)
    if args.data:
        measure(f"data set {args.data}", clips_of(args.data, args.split, args.clips), window, args.repeats)
    if not args.no_synthetic:
        try:
            from mvfouls_ab.data.paths import default_cache_dir
            from mvfouls_ab.data.synthetic import default_data_root
        except ImportError:
            print("\n(synthetic generator not available: skipped)")
        else:
            root = default_data_root(default_cache_dir())
            measure(f"synthetic default data set {root}", clips_of(root, args.split, args.clips), window,
                    args.repeats)
    if not args.no_real_size:
        with tempfile.TemporaryDirectory(prefix="mvfouls_bench_clips_") as tmp:
            paths = make_real_size_clips(Path(tmp), args.clips)
            measure("real-size clips (398x224, written with write_clip)", paths, window, args.repeats)


if __name__ == "__main__":
    main()
