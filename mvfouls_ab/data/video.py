"""Clips <-> frames with PyAV: read the baseline frame window of an MVFouls mp4, and write H.264 mp4s.

The baseline (VARS) reads frames 63..87 of a 25 fps clip at 17 fps: 16 frames around the foul (frame ~75).
`ClipWindow` generalizes that: `num_frames` indices spread evenly over [start, end] (both inclusive).
`decode_clip` decodes only up to the last frame it needs, resizes with libswscale (PyAV `reformat`) and returns
uint8 `[C=3, T, H, W]`. A clip shorter than the window is padded by repeating its last frame; every padded clip
is counted in `SHORT_CLIPS` and reported with one warning.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any

import av
import numpy as np

from ..errors import VideoError, located
from ..fsutil import atomic_path

RESIZE_MODES = ("squash", "crop")

# Clips padded because they were shorter than the window: {"clips": n, "frames": n}. Process-wide.
SHORT_CLIPS: Counter[str] = Counter()


@dataclass(frozen=True)
class ClipWindow:
    """Which frames of a clip to read and at what size. Defaults are the published baseline's."""

    start: int = 63          # first frame (0-based, inclusive)
    end: int = 87            # last frame (inclusive)
    fps: int = 17            # nominal sampling rate inside the window (baseline: 17 of 25 fps -> 16 frames)
    num_frames: int = 16     # frames returned, spread evenly over [start, end]
    size: int = 112          # output height (and width when width is 0)
    width: int = 0           # output width; 0 = size (a square)
    resize: str = "squash"   # squash: scale to height x width as is | crop: keep the aspect ratio, scale to cover
                             # height x width, then crop the centre (398x224 -> 112x112 keeps the middle 224x224)

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"ClipWindow needs 0 <= start <= end, got start={self.start} end={self.end}")
        if self.num_frames < 1 or self.size < 1 or self.fps < 1 or self.width < 0:
            raise ValueError(f"ClipWindow needs num_frames, size and fps >= 1 and width >= 0, got {self}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"ClipWindow resize={self.resize!r} is not one of {', '.join(RESIZE_MODES)}")

    @property
    def height(self) -> int:
        return self.size

    @property
    def out_width(self) -> int:
        return self.width or self.size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The decoded array's shape: [C=3, T, height, width]."""
        return (3, self.num_frames, self.height, self.out_width)

    @classmethod
    def from_config(cls, cfg: Any) -> ClipWindow:
        return cls(start=cfg.frame_start, end=cfg.frame_end, fps=cfg.fps, num_frames=cfg.num_frames,
                   size=cfg.frame_size, width=getattr(cfg, "frame_width", 0), resize=getattr(cfg, "resize", "squash"))

    @cached_property
    def indices(self) -> tuple[int, ...]:
        """Frame indices read, e.g. (63, 65, 66, ..., 87) for the baseline window."""
        return tuple(int(i) for i in np.rint(np.linspace(self.start, self.end, self.num_frames)))

    @cached_property
    def _key(self) -> str:
        key = f"f{'-'.join(map(str, self.indices))}_s{self.size}"
        if (self.width, self.resize) != (0, "squash"):   # legacy keys unchanged for square squashed windows
            key += f"x{self.out_width}_{self.resize}"
        return key

    def key(self) -> str:
        """What determines the decoded array (used in cache keys)."""
        return self._key


def _open_error(path: Path, exc: Exception, action_id: str | None) -> VideoError:
    return VideoError(located(path, f"cannot decode the clip ({type(exc).__name__}: {exc})",
                              "the mp4 is corrupt or truncated: re-download or re-generate this clip", action_id))


def _resized(frame: av.VideoFrame, window: ClipWindow) -> np.ndarray:
    """One frame as uint8 RGB [height, width, 3] by the window's resize mode (libswscale does the scaling)."""
    height, width = window.height, window.out_width
    if window.resize == "squash" or frame.width * height == frame.height * width:
        return frame.reformat(width=width, height=height, format="rgb24", interpolation="BILINEAR").to_ndarray()
    scale = max(width / frame.width, height / frame.height)      # cover height x width, aspect kept
    sw, sh = max(width, round(frame.width * scale)), max(height, round(frame.height * scale))
    rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="BILINEAR").to_ndarray()
    top, left = (sh - height) // 2, (sw - width) // 2
    return np.ascontiguousarray(rgb[top:top + height, left:left + width])


def decode_frames(path: Path | str, window: ClipWindow, action_id: str | None = None) -> tuple[np.ndarray, int]:
    """Decode the window of one clip: (uint8 [C,T,H,W], number of padded frames). No warnings, no counters."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(located(path, "clip file not found", "check data_root and that the download is complete",
                                 action_id))
    if path.stat().st_size == 0:
        raise VideoError(located(path, "clip file is empty (0 bytes)",
                                 "re-download or re-generate this clip (an interrupted copy leaves empty files)",
                                 action_id))
    wanted = window.indices
    last = wanted[-1]
    picked: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(located(path, "the file has no video stream",
                                         "replace it with the real clip (this file holds audio or data only)",
                                         action_id))
            stream = container.streams.video[0]
            needed = set(wanted)
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                if index in needed:
                    picked[index] = _resized(frame, window)
                if index >= last:
                    break
                prev = frame
            else:
                if decoded and decoded - 1 not in picked:
                    picked[decoded - 1] = _resized(prev, window)
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _open_error(path, exc, action_id) from None
    if decoded == 0:
        raise VideoError(located(path, "the video stream has no decodable frames",
                                 "re-download or re-generate this clip", action_id))
    final = decoded - 1
    frames = [picked[i] if i <= final else picked[final] for i in wanted]
    padded = sum(1 for i in wanted if i > final)
    return np.ascontiguousarray(np.stack(frames).transpose(3, 0, 1, 2)), padded


def note_padding(path: Path | str, window: ClipWindow, padded: int) -> None:
    """Count a clip shorter than the window and warn once for it."""
    if padded:
        SHORT_CLIPS["clips"] += 1
        SHORT_CLIPS["frames"] += padded
        warnings.warn(f"{path}: clip ends before frame {window.indices[-1]}; padded {padded} of "
                      f"{window.num_frames} frames by repeating its last frame "
                      f"({SHORT_CLIPS['clips']} short clip(s) so far)", stacklevel=3)


def decode_clip(path: Path | str, window: ClipWindow, action_id: str | None = None) -> np.ndarray:
    """Decode the frames of `window` from one mp4 into uint8 [C=3, T=window.num_frames, size, size].

    Raises VideoError (naming the file, the action and the fix) for a missing, empty or corrupt file, or one
    without a video stream.
    """
    frames, padded = decode_frames(path, window, action_id)
    note_padding(path, window, padded)
    return frames


def write_clip(path: Path | str, frames: np.ndarray, fps: int = 25, codec: str = "libx264", *,
               crf: int = 23, preset: str = "ultrafast", audio: bool = False, threads: int = 0) -> Path:
    """Write uint8 frames [T, H, W, 3] (RGB) as an H.264 mp4, atomically (temporary file, then rename).

    H and W must be even (yuv420p). `audio=True` adds a silent AAC track, as the real clips have one.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"write_clip needs uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"write_clip needs even height and width for H.264 yuv420p, got {width}x{height}")
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": preset, "crf": str(crf)}
            if threads:   # x264 threads (default: its own choice); 1 suits one encoder per core
                stream.options = {**stream.options, "threads": str(threads)}
        astream = out.add_stream("aac", rate=16000, layout="mono") if audio else None
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if astream is not None:
            samples = round(len(frames) / fps * 16000)
            for start in range(0, samples, 1024):
                n = min(1024, samples - start)
                silent = av.AudioFrame.from_ndarray(np.zeros((1, n), np.float32), format="fltp", layout="mono")
                silent.sample_rate, silent.pts = 16000, start
                out.mux(astream.encode(silent))
            out.mux(astream.encode(None))
    return path
