"""Multi-view clip datasets over a decode-once clip cache.

`ClipCache` decodes each (clip, window) once into a uint8 `.npy` file and memory-maps it on every later read,
so epochs after the first never touch the video decoder. `MultiViewDataset` turns a split into samples of
2-4 views with a view mask; `load_data(cfg)` loads and validates all splits into a `DataBundle`.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import uuid
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from .annotations import Action, Clip, SplitAnnotations, load_split
from .video import ClipWindow, decode_frames, note_padding

MAX_VIEWS = 4  # the real data set has 2 to 4 views per action; evaluation pads to this many


def default_cache_dir(cfg: Any | None = None) -> Path:
    """cfg.cache_dir, else $MVFOULS_AB_CACHE, else ~/.cache/mvfouls_ab: the one place the default is resolved."""
    configured = (getattr(cfg, "cache_dir", "") if cfg is not None else "") or os.environ.get("MVFOULS_AB_CACHE", "")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mvfouls_ab"


class ClipCache:
    """Decoded clips as uint8 [C,T,H,W] .npy files under `cache_dir/clips`, memory-mapped on read.

    A cache file is keyed by the clip's absolute path, byte size and modification time (a replaced video is
    decoded again) and by the window's frame indices and size. Files are written to a temporary name and
    renamed, so a reader never sees a partial array and concurrent writers are harmless.
    """

    def __init__(self, cache_dir: Path | str):
        self.root = Path(cache_dir).expanduser() / "clips"
        self.hits = 0
        self.misses = 0

    def file_for(self, clip: Clip | Path | str, window: ClipWindow) -> Path:
        path = Path(os.path.abspath(clip.path if isinstance(clip, Clip) else clip))
        stat = path.stat()
        key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{window.key()}"
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.npy"

    def get(self, clip: Clip | Path | str, window: ClipWindow, action_id: str | None = None) -> np.ndarray:
        """The window of `clip` as a read-only memory-mapped uint8 [C,T,H,W] array (decoded on a miss)."""
        clip_path = clip.path if isinstance(clip, Clip) else Path(clip)
        try:
            target = self.file_for(clip_path, window)
        except FileNotFoundError:
            target = None  # decode_frames raises the VideoError naming file, action and fix
        if target is not None:
            array = _load(target, window)
            if array is not None:
                self.hits += 1
                return array
        self.misses += 1
        frames, padded = decode_frames(clip_path, window, action_id)
        note_padding(clip_path, window, padded)
        assert target is not None
        _save(target, frames)
        mapped = _load(target, window)
        return frames if mapped is None else mapped

    def missing(self, actions: list[Action], window: ClipWindow) -> list[tuple[Clip, str]]:
        """(clip, action id) of every clip of `actions` whose window is not cached yet."""
        out = []
        for action in actions:
            for clip in action.clips:
                try:
                    if _load(self.file_for(clip, window), window) is not None:
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
        bar = tqdm(total=len(jobs), desc=f"decoding clips ({window.num_frames}x{window.size}px)", unit="clip",
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


def _decode_job(job: tuple[str, str, ClipWindow, str]) -> int:
    clip_path, action_id, window, target = job
    frames, padded = decode_frames(clip_path, window, action_id)
    _save(Path(target), frames)
    return padded


def _load(target: Path, window: ClipWindow) -> np.ndarray | None:
    """The cached array, memory-mapped read-only, or None when missing or not of the expected shape (then the
    clip is decoded again). Reads the .npy header and maps the file directly: about half the cost of
    np.load(mmap_mode="r"), which opens the file twice and builds an np.memmap."""
    try:
        with open(target, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (FileNotFoundError, ValueError, OSError):
        return None
    expected = (3, window.num_frames, window.size, window.size)
    if dtype != np.uint8 or shape != expected or fortran or len(mapped) != offset + int(np.prod(expected)):
        return None
    return np.frombuffer(mapped, np.uint8, count=int(np.prod(expected)), offset=offset).reshape(expected)


def _save(target: Path, frames: np.ndarray) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.save(handle, frames)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


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
        clips = np.zeros((self.width, 3, w.num_frames, w.size, w.size), np.uint8)
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
        """Decode every clip of every split once (later reads are memory-mapped). Returns clips decoded."""
        assert self.cache is not None and self.window is not None
        return sum(self.cache.warm(s.actions, self.window, workers, progress) for s in self.splits().values())

    def summary(self) -> str:
        return "; ".join(s.summary() for s in self.splits().values())


def load_data(cfg: Any) -> DataBundle:
    """Load and validate Train/Valid/Test (and Chall when present) of cfg.data_root.

    cfg.data_root "" means the cached synthetic MVFouls data set (generated on first use). Nothing is decoded
    here; call `bundle.warm()` to fill the clip cache up front, or let the datasets fill it on first read.
    """
    cache_dir = default_cache_dir(cfg)
    if cfg.data_root:
        root = Path(cfg.data_root).expanduser()
    else:
        from .synthetic import default_data_root  # generates the synthetic data set on first use

        root = Path(default_data_root(cache_dir))
    splits = {name: load_split(root, name) for name in ("Train", "Valid", "Test")}
    chall = load_split(root, "Chall") if (root / "Chall").is_dir() else None
    return DataBundle(splits["Train"], splits["Valid"], splits["Test"], chall,
                      Path(os.path.abspath(root)), ClipCache(cache_dir), ClipWindow.from_config(cfg))
