from __future__ import annotations

import warnings
from fractions import Fraction

import av
import numpy as np
import pytest

from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.data.video import SHORT_CLIPS, ClipWindow, decode_clip, write_clip
from mvfouls_ab.errors import VideoError


def ramp(frames: int, height: int = 36, width: int = 64) -> np.ndarray:
    """Flat frames whose red channel is 2 * frame index: the decoded value tells which frame was read."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    video[..., 0] = (2 * np.arange(frames))[:, None, None]
    video[..., 1] = 128
    return video


def test_window_defaults_match_baseline_and_config():
    window = ClipWindow()
    assert len(window.indices) == 16 and window.indices[0] == 63 and window.indices[-1] == 87
    assert list(window.indices) == sorted(set(window.indices))
    cfg = TrainingConfig(frame_start=10, frame_end=40, fps=10, num_frames=4, frame_size=32)
    window = ClipWindow.from_config(cfg)
    assert (window.start, window.end, window.fps, window.num_frames, window.size) == (10, 40, 10, 4, 32)
    assert window.indices == (10, 20, 30, 40)
    assert ClipWindow(start=5, end=5, num_frames=3).indices == (5, 5, 5)
    with pytest.raises(ValueError):
        ClipWindow(start=10, end=5)


def test_write_then_decode_reads_the_window_frames(tmp_path):
    path = write_clip(tmp_path / "a" / "clip_0.mp4", ramp(100))
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    window = ClipWindow(start=63, end=87, num_frames=16, size=48)
    clip = decode_clip(path, window)
    assert clip.dtype == np.uint8 and clip.shape == (3, 16, 48, 48) and clip.flags.c_contiguous
    red = clip[0, :, 24, 24].astype(int)
    assert np.abs(red - 2 * np.array(window.indices)).max() <= 4
    assert np.abs(clip[1].astype(int) - 128).max() <= 4
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == Fraction(25)
        assert (stream.width, stream.height) == (64, 36)
        assert sum(1 for _ in container.decode(stream)) == 100


def test_clip_with_audio_track_decodes_its_video(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", ramp(90), audio=True)
    with av.open(str(path)) as container:
        assert {s.type for s in container.streams} == {"video", "audio"}
    clip = decode_clip(path, ClipWindow(start=0, end=80, num_frames=5, size=16))
    assert np.abs(clip[0, :, 8, 8].astype(int) - 2 * np.array([0, 20, 40, 60, 80])).max() <= 4


def test_short_clip_is_padded_with_its_last_frame_and_counted(tmp_path):
    path = write_clip(tmp_path / "short.mp4", ramp(80))
    before = SHORT_CLIPS["clips"]
    with pytest.warns(UserWarning, match="short.mp4.*padded 5 of 16"):
        clip = decode_clip(path, ClipWindow())
    assert SHORT_CLIPS["clips"] == before + 1
    red = clip[0, :, 50, 50].astype(int)
    assert np.abs(red[-5:] - 2 * 79).max() <= 4 and len(set(red[-5:])) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_clip(path, ClipWindow(start=0, end=79, num_frames=4))  # fits: no warning, no count
    assert SHORT_CLIPS["clips"] == before + 1


def test_write_clip_rejects_bad_frames_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_clip(tmp_path / "odd.mp4", np.zeros((3, 35, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_clip(tmp_path / "float.mp4", np.zeros((3, 36, 64, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def assert_located(exc: pytest.ExceptionInfo, path, action_id: str) -> None:
    text = str(exc.value)
    assert str(path) in text and f"action {action_id}" in text and "Fix:" in text


def test_zero_byte_clip(tmp_path):
    path = tmp_path / "clip_0.mp4"
    path.touch()
    with pytest.raises(VideoError, match="empty") as exc:
        decode_clip(path, ClipWindow(), action_id="12")
    assert_located(exc, path, "12")


def test_corrupt_clip(tmp_path):
    good = write_clip(tmp_path / "good.mp4", ramp(100)).read_bytes()
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good[: len(good) // 3])
    for path in (garbage, truncated):
        with pytest.raises(VideoError, match="cannot decode") as exc:
            decode_clip(path, ClipWindow(), action_id="3")
        assert_located(exc, path, "3")


def test_clip_without_video_stream(tmp_path):
    path = tmp_path / "audio_only.mp4"
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        for start in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(VideoError, match="no video stream") as exc:
        decode_clip(path, ClipWindow(), action_id="7")
    assert_located(exc, path, "7")


def test_missing_clip(tmp_path):
    with pytest.raises(VideoError, match="not found") as exc:
        decode_clip(tmp_path / "nope.mp4", ClipWindow(), action_id="0")
    assert_located(exc, tmp_path / "nope.mp4", "0")
