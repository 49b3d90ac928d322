"""Multi-view clip datasets over a decode-once clip cache.

`ClipCache` decodes each (clip, window) once into a uint8 `.npy` file, and `ClipCache.pack` consolidates the
windows of a whole split into one memory-mapped array (a "pack"; `DataBundle.warm` packs every split), so a
cached read is a stat of the clip (is it still the video that was decoded?), a dict lookup and a slice copy,
and epochs after the first never touch the video decoder. `MultiViewDataset` turns a split into samples of
2-4 views with a view mask; `load_data(cfg)` loads and validates all splits into a `DataBundle`.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ..errors import VideoError, located
from ..fsutil import atomic_path, atomic_write
from .annotations import Action, Clip, SplitAnnotations, load_split
from .paths import data_root, default_cache_dir
from .video import ClipWindow, decode_frames, note_padding

MAX_VIEWS = 4  # the real data set has 2 to 4 views per action; evaluation pads to this many


class ClipCache:
    """Decoded clips as uint8 [C,T,H,W] arrays: one .npy per clip under `cache_dir/clips`, and packs of whole
    splits under `cache_dir/packs`, all memory-mapped on read.

    A cached window is keyed by the clip's absolute path, byte size and modification time (a replaced video is
    decoded again) and by the window's frame indices and size (`key_for`). `get` looks the key up in the packs
    loaded so far, then in the per-clip files, and decodes on a miss. `pack` writes the windows of a list of
    actions as one uint8 [N,C,T,H,W] .npy (`packs/<sha1 of the keys>.npy`) with the keys beside it in
    `<sha1>.json`, then deletes the per-clip files of those clips, so the disk holds each window once. A pack
    that is truncated, corrupt or of the wrong shape is ignored (its clips are decoded again). Files are written
    to a temporary name and renamed (a pack's index before its array), so a reader never sees a partial file and
    concurrent writers are harmless; files are never rewritten in place, which would break readers that have
    them mapped. `hits` counts reads served from the cache, `misses` clips decoded.
    """

    def __init__(self, cache_dir: Path | str):
        self.root = Path(cache_dir).expanduser() / "clips"
        self.packs_dir = self.root.parent / "packs"
        self.hits = 0
        self.misses = 0
        self._reset_packs()

    def _reset_packs(self) -> None:
        self._rows: dict[str, np.ndarray] = {}     # key -> its row of a loaded pack (a read-only mmap view)
        self._seen: dict[str, tuple] = {}          # pack digest -> stat signature of its files when last read
        self._loaded: set[str] = set()             # digests of the packs whose rows are in _rows

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (DataLoader workers started with spawn) without the mapped packs: they are loaded again on
        the first read that needs them."""
        state = dict(self.__dict__)
        for name in ("_rows", "_seen", "_loaded"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_packs()

    @staticmethod
    def key_for(clip: Clip | Path | str, window: ClipWindow) -> str:
        """"abs path|size|mtime_ns|window key": what the cached window of `clip` depends on (stats the clip)."""
        path = os.path.abspath(clip.path if isinstance(clip, Clip) else clip)
        stat = os.stat(path)
        return f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{window.key()}"

    def _file(self, key: str) -> Path:
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.npy"

    def file_for(self, clip: Clip | Path | str, window: ClipWindow) -> Path:
        """The per-clip .npy of `clip`'s window (which may not exist, e.g. once the clip is packed)."""
        return self._file(self.key_for(clip, window))

    def get(self, clip: Clip | Path | str, window: ClipWindow, action_id: str | None = None) -> np.ndarray:
        """The window of `clip` as a read-only memory-mapped uint8 [C,T,H,W] array (decoded on a miss)."""
        clip_path = clip.path if isinstance(clip, Clip) else Path(clip)
        try:
            key = self.key_for(clip_path, window)
        except FileNotFoundError:
            key = None  # decode_frames raises the VideoError naming file, action and fix
        array = None if key is None else self._cached(key, window)
        if array is not None:
            self.hits += 1
            return array
        self.misses += 1
        return self._decode(clip_path, key, window, action_id)

    def _cached(self, key: str, window: ClipWindow) -> np.ndarray | None:
        """The cached window of `key`: its row of a loaded pack, else its per-clip file, else (when packs were
        written since the last look, which deletes per-clip files) its row of a new pack; None when not cached."""
        row = self._rows.get(key)
        if row is not None:
            return row
        array = _load(self._file(key), _shape(window))
        if array is None and self.load_packs():
            return self._rows.get(key)
        return array

    def _decode(self, clip_path: Path, key: str | None, window: ClipWindow, action_id: str | None) -> np.ndarray:
        """Decode the window of one clip into its per-clip file; the file memory-mapped (else the frames)."""
        frames, padded = decode_frames(clip_path, window, action_id)
        note_padding(clip_path, window, padded)
        assert key is not None
        target = self._file(key)
        _save(target, frames)
        mapped = _load(target, _shape(window))
        return frames if mapped is None else mapped

    def load_packs(self) -> int:
        """Load the packs under `packs/` not loaded yet (or replaced since); returns how many were loaded.

        Cheap when nothing changed (a listing and two stats per pack); `get` calls it on a miss, so packs
        written by other processes are found before a clip is decoded again."""
        try:
            names = os.listdir(self.packs_dir)
        except FileNotFoundError:
            return 0
        loaded = 0
        for name in names:
            digest, suffix = os.path.splitext(name)
            if suffix != ".json" or name.startswith("."):
                continue
            signature = _pack_signature(self.packs_dir / digest)
            if signature is None or self._seen.get(digest) == signature:
                continue
            self._seen[digest] = signature
            rows = _load_pack(self.packs_dir / digest)
            if rows is None:
                self._loaded.discard(digest)
                continue
            self._rows.update(rows)
            self._loaded.add(digest)
            loaded += 1
        return loaded

    def missing(self, actions: list[Action], window: ClipWindow) -> list[tuple[Clip, str]]:
        """(clip, action id) of every clip of `actions` whose window is not cached yet (in a pack or a file)."""
        self.load_packs()
        out = []
        for action in actions:
            for clip in action.clips:
                try:
                    if self._cached(self.key_for(clip, window), window) is not None:
                        continue
                except FileNotFoundError:
                    pass
                out.append((clip, action.action_id))
        return out

    def warm(self, actions: list[Action], window: ClipWindow, workers: int = 0, progress: bool = True) -> int:
        """Decode every clip of `actions` not cached yet (in `workers` processes when > 1). Returns the count."""
        todo = self.missing(actions, window)
        if not todo:
            return 0
        jobs = [(str(clip.path), action_id, window, str(self.file_for(clip, window))) for clip, action_id in todo]
        bar = tqdm(total=len(jobs), desc=f"decoding clips ({window.num_frames}x{window.height}x{window.out_width}px)", unit="clip",
                   disable=not progress)
        try:
            if workers <= 1:
                for job in jobs:
                    note_padding(job[0], window, _decode_job(job))
                    bar.update()
            else:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    futures = {pool.submit(_decode_job, job): job for job in jobs}
                    pending = set(futures)
                    while pending:
                        done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                        for future in done:
                            note_padding(futures[future][0], window, future.result())  # re-raises errors
                            bar.update()
        finally:
            bar.close()
        self.misses += len(jobs)
        return len(jobs)

    def pack(self, actions: list[Action], window: ClipWindow, workers: int = 0, progress: bool = False) -> Path:
        """Consolidate the windows of every clip of `actions` (in action, clip order) into one pack; returns
        its .npy. Clips not cached yet are decoded first (`warm`); once the pack is written and loaded, the
        per-clip files of its clips are deleted. A valid pack of the same clips is reused, not written again."""
        self.warm(actions, window, workers, progress)
        clips = [(clip, action.action_id) for action in actions for clip in action.clips]
        keys = [self.key_for(clip, window) for clip, _ in clips]
        digest = _pack_digest(keys)
        base = self.packs_dir / digest
        self.load_packs()
        if digest not in self._loaded:
            rows = tqdm(self._windows(clips, keys, window), total=len(keys), unit="clip", disable=not progress,
                        desc=f"packing clips ({window.num_frames}x{window.height}x{window.out_width}px)")
            _save_pack(base, keys, _shape(window), rows)
            self.load_packs()
            if digest not in self._loaded:
                raise OSError(f"{base}.npy: the pack just written cannot be read back (disk full or failing?)")
        for key in keys:
            self._file(key).unlink(missing_ok=True)
        return base.with_suffix(".npy")

    def _windows(self, clips: list[tuple[Clip, str]], keys: list[str], window: ClipWindow):
        """The cached window of each clip, one at a time (decoded again if it vanished since `warm`)."""
        for (clip, action_id), key in zip(clips, keys, strict=True):
            row = self._cached(key, window)
            if row is None:
                self.misses += 1
                row = self._decode(Path(clip.path), key, window, action_id)
            yield row


def _shape(window: ClipWindow) -> tuple[int, int, int, int]:
    """The shape of one cached window: [C=3, T, height, width]."""
    return window.shape


def _decode_job(job: tuple[str, str, ClipWindow, str]) -> int:
    clip_path, action_id, window, target = job
    frames, padded = decode_frames(clip_path, window, action_id)
    _save(Path(target), frames)
    return padded


def _load(target: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The uint8 array of a .npy file, memory-mapped read-only, or None when missing, truncated or not of the
    expected shape (then its clips are decoded again). Reads the .npy header and maps the file directly: about
    half the cost of np.load(mmap_mode="r"), which opens the file twice and builds an np.memmap."""
    try:
        with open(target, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            found, fortran, dtype = read_header(handle)
            offset = handle.tell()
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (FileNotFoundError, ValueError, OSError):
        return None
    size = int(np.prod(shape))
    if dtype != np.uint8 or found != tuple(shape) or fortran or len(mapped) != offset + size:
        return None
    return np.frombuffer(mapped, np.uint8, count=size, offset=offset).reshape(shape)


def _save(target: Path, frames: np.ndarray) -> None:
    atomic_write(target, lambda handle: np.save(handle, frames))


def _pack_digest(keys: list[str]) -> str:
    """The name of the pack of these keys: sha1 over the ordered keys."""
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()


def _pack_signature(base: Path) -> tuple[int, ...] | None:
    """(inode, size, mtime) of a pack's .json and .npy (None while either is missing): a changed signature
    means the pack was replaced and is read again."""
    try:
        index, array = os.stat(base.with_suffix(".json")), os.stat(base.with_suffix(".npy"))
    except FileNotFoundError:
        return None
    return (index.st_ino, index.st_size, index.st_mtime_ns, array.st_ino, array.st_size, array.st_mtime_ns)


def _load_pack(base: Path) -> dict[str, np.ndarray] | None:
    """{key: its row} of the pack at `base` (.json index + .npy array, memory-mapped once), or None when the
    index does not match its name or the array is missing, truncated or not of the shape the index gives."""
    try:
        index = json.loads(base.with_suffix(".json").read_text())
        keys, shape = index["keys"], tuple(index["shape"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or _pack_digest(keys) != base.name:
        return None
    array = _load(base.with_suffix(".npy"), (len(keys), *shape))
    return None if array is None else dict(zip(keys, array))


def _save_pack(base: Path, keys: list[str], shape: tuple[int, ...], rows: Any) -> None:
    """Write the pack of `keys` at `base`: the .npy streamed from `rows` (uint8 arrays of `shape`, one per
    key, never all in memory), then the .json index; both to temporary names, renamed index first."""
    with atomic_path(base.with_suffix(".npy")) as tmp_array:     # renamed last, after the index
        with open(tmp_array, "wb") as handle:
            header = {"descr": "|u1", "fortran_order": False, "shape": (len(keys), *shape)}
            np.lib.format.write_array_header_1_0(handle, header)
            written = 0
            for row in rows:
                if row.shape != shape or row.dtype != np.uint8:
                    raise ValueError(f"{base}.npy: row {written} has shape {row.shape}, expected {shape}")
                handle.write(np.ascontiguousarray(row).data)
                written += 1
            if written != len(keys):
                raise ValueError(f"{base}.npy: {written} rows written for {len(keys)} keys")
        atomic_write(base.with_suffix(".json"), json.dumps({"shape": list(shape), "keys": keys}))


class MultiViewDataset(Dataset):
    """One split as multi-view samples.

    Item: {"clips": uint8 [V,C,T,H,W], "view_mask": bool [V], "action": int64 (-1 unknown),
    "severity": int64 (-1 unknown), "index": int}. `views=k` samples k distinct views per action (training;
    fewer views than k are padded and masked); `views=None` returns every view, padded to 4 (evaluation).
    View sampling depends only on (seed, epoch, index), so it is the same with any number of loader workers;
    the epoch lives in shared memory, so `set_epoch` reaches persistent workers too.
    """

    def __init__(self, split: SplitAnnotations, window: ClipWindow, cache: ClipCache, views: int | None = None,
                 seed: int = 0):
        if views is not None and views < 1:
            raise ValueError(f"views must be >= 1 or None, got {views}")
        self.split, self.window, self.cache, self.views, self.seed = split, window, cache, views, seed
        most = max((len(a.clips) for a in split.actions), default=MAX_VIEWS)
        self.width = views if views is not None else max(MAX_VIEWS, most)
        self.targets = split.targets()
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.split.actions)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def view_indices(self, index: int) -> list[int]:
        """The views of action `index` used in this epoch (sorted)."""
        n = len(self.split.actions[index].clips)
        if self.views is None or self.views >= n:
            return list(range(n))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return sorted(int(v) for v in rng.choice(n, size=self.views, replace=False))

    def __getitem__(self, index: int) -> dict[str, Any]:
        action = self.split.actions[index]
        w = self.window
        clips = np.zeros((self.width, *w.shape), np.uint8)
        mask = np.zeros(self.width, bool)
        for slot, view in enumerate(self.view_indices(index)):
            clips[slot] = self.cache.get(action.clips[view], w, action.action_id)
            mask[slot] = True
        return {
            "clips": torch.from_numpy(clips),
            "view_mask": torch.from_numpy(mask),
            "action": torch.tensor(self.targets["action"][index]),
            "severity": torch.tensor(self.targets["severity"][index]),
            "index": index,
        }


class EpochShuffle(Sampler[int]):
    """A permutation of the dataset drawn from (seed, dataset.epoch): the order depends on nothing else (not on
    the number of workers, not on earlier epochs), so a resumed run sees the same batches."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        epoch = int(getattr(self.dataset, "epoch", 0))
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        return iter(torch.randperm(len(self.dataset), generator=generator).tolist())


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, cfg: Any, shuffle: bool, sampler: Sampler | None = None,
                batch_size: int | None = None) -> DataLoader:
    """A DataLoader with cfg's batch size, workers and pinned memory (when CUDA is there).

    shuffle=True (and no sampler) shuffles with EpochShuffle(cfg.seed): call dataset.set_epoch(e) before each
    epoch and both the order and the sampled views follow (seed, epoch).
    """
    workers = int(cfg.num_workers)
    if sampler is None and shuffle:
        sampler = EpochShuffle(dataset, int(cfg.seed))
    return DataLoader(
        dataset,
        batch_size=batch_size or cfg.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=bool(cfg.pin_memory) and torch.cuda.is_available(),
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=torch.Generator().manual_seed(int(cfg.seed)),
    )


@dataclass
class DataBundle:
    """All splits of one data set, validated, plus the clip cache and window they are read with."""

    train: SplitAnnotations
    valid: SplitAnnotations
    test: SplitAnnotations
    chall: SplitAnnotations | None
    root: Path
    cache: ClipCache | None = None
    window: ClipWindow | None = None

    def splits(self) -> dict[str, SplitAnnotations]:
        out = {"Train": self.train, "Valid": self.valid, "Test": self.test}
        if self.chall is not None:
            out["Chall"] = self.chall
        return out

    def dataset(self, split: str, views: int | None = None, seed: int = 0) -> MultiViewDataset:
        """A MultiViewDataset of one split ("Train", "Valid", "Test", "Chall") read through the bundle's cache."""
        assert self.cache is not None and self.window is not None
        return MultiViewDataset(self.splits()[split], self.window, self.cache, views, seed)

    def warm(self, workers: int = 0, progress: bool = True) -> int:
        """Decode every clip of every split once, then pack each split (`ClipCache.pack`: later reads are a
        slice of one memory-mapped array per split). Returns clips decoded."""
        assert self.cache is not None and self.window is not None
        before = self.cache.misses
        for split in self.splits().values():
            self.cache.pack(split.actions, self.window, workers, progress)   # decodes what is missing first
        return self.cache.misses - before

    def summary(self) -> str:
        return "; ".join(s.summary() for s in self.splits().values())


NATIVE_MAX_HEIGHT = 224   # frame_size=0 ("native"): the clips' own size, scaled down to at most this height


def native_size(path: Path | str) -> tuple[int, int]:
    """(height, width) of a clip's video stream, read from its header (nothing decoded)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return int(stream.codec_context.height), int(stream.codec_context.width)
    except (av.FFmpegError, OSError, IndexError, ValueError) as exc:
        raise VideoError(located(path, f"cannot read the clip's frame size ({type(exc).__name__}: {exc})",
                                 "the mp4 is corrupt or truncated: re-download or re-generate this clip")) from None


def resolve_frame_size(cfg: Any, data: DataBundle) -> Any:
    """cfg with concrete frame sizes: frame_size=0 (with frame_width=0) means the data's native frame size (its
    first Train clip), scaled down to at most NATIVE_MAX_HEIGHT rows with the aspect ratio kept (398x224 -> 398x224,
    720p -> 398x224, the synthetic 256x144 -> 256x144). Also sets the bundle's window. Any other cfg is returned as is.
    """
    if cfg.frame_size > 0:
        return cfg
    clip = next(c for a in data.train.actions for c in a.clips)
    h, w = native_size(clip.path)
    scale = min(1.0, NATIVE_MAX_HEIGHT / h)
    height = max(2, round(h * scale / 2) * 2)
    width = max(2, round(w * scale / 2) * 2) if cfg.frame_width == 0 else cfg.frame_width
    resolved = cfg.replace(frame_size=height, frame_width=width)
    data.window = ClipWindow.from_config(resolved)
    return resolved


def load_data(cfg: Any) -> DataBundle:
    """Load and validate Train/Valid/Test (and Chall when present) of cfg.data_root.

    cfg.data_root "" means the cached synthetic MVFouls data set (generated on first use). Nothing is decoded
    here; call `bundle.warm()` to fill and pack the clip cache up front, or let the datasets fill it (one file
    per clip, not packed) on first read.
    """
    cache_dir = default_cache_dir(cfg)
    root = data_root(cfg)
    splits = {name: load_split(root, name) for name in ("Train", "Valid", "Test")}
    chall = load_split(root, "Chall") if (root / "Chall").is_dir() else None
    bundle = DataBundle(splits["Train"], splits["Valid"], splits["Test"], chall, Path(os.path.abspath(root)),
                        ClipCache(cache_dir), ClipWindow.from_config(cfg) if cfg.frame_size > 0 else None)
    resolve_frame_size(cfg, bundle)
    return bundle
