"""Download the real SoccerNet MVFouls data set: ``python -m mvfouls_ab.download --out DIR``.

The data set sits behind an NDA in a gated Hugging Face dataset repo (``SoccerNet/SN-MVFouls-2024``, files
``train.zip valid.zip test.zip challenge.zip``, and ``*_720p.zip`` for the 720p release). Access is a permission
on your Hugging Face account: sign the NDA (the SoccerNet MVFouls page), then request access on the repo's page;
once granted, ``hf auth login`` (or ``export HF_TOKEN=hf_...``) lets this command fetch the zips.

Steps, per split: fetch the zip with ``huggingface_hub.hf_hub_download`` (an interrupted download resumes where it
stopped), check it (a readable zip, no entry outside the split, CRC of every file while unpacking), check the free
disk space against its uncompressed size, unpack it into a hidden folder next to the target and rename that to
``Train/ Valid/ Test/ Chall/`` (nothing half-unpacked is ever left under those names), then load every split with
the project's own loader (the official filter, every clip on disk) and print the kept counts per class next to the
published ones, and what the filter dropped and why. Errors a user can cause (no token, no access, a damaged zip,
a full disk) print one line naming the file or repo and the fix, and exit 2.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import MVFoulsError, located

REPO_ID = "SoccerNet/SN-MVFouls-2024"
REPO_URL = f"https://huggingface.co/datasets/{REPO_ID}"
NDA_URL = "https://www.soccer-net.org/data"
SPLITS: dict[str, str] = {"train": "Train", "valid": "Valid", "test": "Test", "challenge": "Chall"}
VERSIONS = ("224p", "720p")
DISK_MARGIN = 256 * 2**20          # bytes kept free beyond what a step needs

# What the real data set looks like after the official filter (../shared/MVFOULS.md); None where unpublished.
PUBLISHED: dict[str, dict[str, Any]] = {
    "Train": {"total": 2916, "kept": 2319, "severity": [304, 1303, 685, 27],
              "action": [357, 1038, 90, 273, 73, 124, 336, 28]},
    "Valid": {"total": 411, "kept": 321, "severity": [32, 182, 104, 3], "action": None},
    "Test": {"total": 301, "kept": 251, "severity": [21, 157, 68, 5], "action": [43, 107, 6, 28, 5, 11, 46, 5]},
    "Chall": {"total": 273, "kept": 273, "severity": None, "action": None},
}
RULE_TEXT = {
    "action_empty_or_dont_know": 'Action class is "" or "Dont know"',
    "offence_empty_or_between": 'Offence is "" or "Between" (and not a Dive)',
    "severity_empty_or_borderline": 'Severity is "", "2.0" or "4.0" (and not a Dive, not "No offence")',
    "offence_severity_unmapped": "Offence/Severity pair the official labels do not map",
}


class DownloadError(MVFoulsError):
    """The data set cannot be fetched or unpacked (token, access, network, damaged zip, disk space)."""


def zip_name(split: str, version: str) -> str:
    return f"{split}{'_720p' if version == '720p' else ''}.zip"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Raise DownloadError when `folder`'s file system has less than `needed` bytes (+ a margin) free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed + DISK_MARGIN:
        raise DownloadError(located(folder, f"not enough disk space to {what}: needs {_size(needed)} "
                                    f"(+ {_size(DISK_MARGIN)} margin), {_size(free)} free",
                                    "free space there, or pass --out (and --zips) on a larger disk"))


# ---- fetching -------------------------------------------------------------------------------------------------
def resolve_token(token: str | None) -> str:
    """--token, else $HF_TOKEN, else the token `hf auth login` saved; DownloadError when there is none."""
    if token:
        return token
    from huggingface_hub import get_token

    found = os.environ.get("HF_TOKEN") or get_token()
    if not found:
        raise DownloadError(located(REPO_ID, "no Hugging Face token found (HF_TOKEN is unset and no `hf auth "
                                    "login` was made); the MVFouls repo is gated",
                                    f"sign the NDA ({NDA_URL}), request access at {REPO_URL}, then run "
                                    "`hf auth login` or export HF_TOKEN=hf_..."))
    return found


def fetch_zip(filename: str, zips: Path, token: str, revision: str = "main", endpoint: str | None = None,
              repo_id: str = REPO_ID) -> Path:
    """Download one zip of the repo into `zips` (resumes a partial download); returns its path."""
    from huggingface_hub import errors as hf
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    url = f"https://huggingface.co/datasets/{repo_id}"
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type="dataset", revision=revision,
                                               endpoint=endpoint), token=token, endpoint=endpoint)
        target = zips / filename
        have = target.stat().st_size if target.is_file() else 0
        if meta.size and have != meta.size:
            check_free_space(zips, meta.size - have, f"download {filename}")
        path = hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision, token=token,
                               local_dir=zips, endpoint=endpoint)
    except hf.GatedRepoError:
        raise DownloadError(located(repo_id, "your Hugging Face account has no access to this gated repo yet",
                                    f"sign the NDA ({NDA_URL}), then press 'Request access' at {url} with the "
                                    "account of your token and wait for the approval e-mail")) from None
    except (hf.RemoteEntryNotFoundError, hf.EntryNotFoundError):
        raise DownloadError(located(f"{repo_id}/{filename}", "no such file in the repo",
                                    f"check --version and --splits (files: {url}/tree/{revision})")) from None
    except hf.RevisionNotFoundError:
        raise DownloadError(located(repo_id, f"revision {revision!r} not found", "use --revision main")) from None
    except hf.RepositoryNotFoundError:
        raise DownloadError(located(repo_id, "repo not found or the token is not valid (401/404)",
                                    "check the token (`hf auth whoami`), log in again with `hf auth login`, and "
                                    f"that {url} opens in your browser")) from None
    except hf.LocalEntryNotFoundError as exc:
        raise DownloadError(located(url, f"cannot reach the Hugging Face Hub ({exc})",
                                    "check the network (or HF_ENDPOINT), then run the command again: it resumes"
                                    )) from None
    except hf.HfHubHTTPError as exc:
        first = str(exc).splitlines()[0]
        raise DownloadError(located(f"{repo_id}/{filename}", f"download failed ({first})",
                                    "run the command again: a partial download resumes")) from None
    except OSError as exc:
        if exc.errno == 28:      # ENOSPC
            raise DownloadError(located(zips, f"disk full while downloading {filename}",
                                        "free space, then run again (the download resumes)")) from None
        raise
    return Path(path)


# ---- unpacking ------------------------------------------------------------------------------------------------
def _members(archive: zipfile.ZipFile, path: Path) -> list[zipfile.ZipInfo]:
    infos = archive.infolist()
    for info in infos:
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise DownloadError(located(path, f"entry {info.filename!r} points outside the folder it unpacks to",
                                        "download the zip again from the official repo"))
    return infos


def _split_root(folder: Path, split: str) -> Path:
    """The folder inside the unpacked zip that holds the split (annotations.json and/or action_<n>/ folders):
    the zip's root or a folder up to three levels down (e.g. ``Train/``, ``train/``, ``mvfouls/Train/``)."""
    def is_split(d: Path) -> bool:
        return (d / "annotations.json").is_file() or any(p.is_dir() and p.name.startswith("action_")
                                                         for p in d.iterdir())
    frontier = [folder]
    for _ in range(4):
        found = [d for d in frontier if is_split(d)]
        if found:
            named = [d for d in found if d.name.lower() in (split.lower(), "challenge" if split == "Chall" else "")]
            return (named or found)[0]
        frontier = [p for d in frontier for p in sorted(d.iterdir()) if p.is_dir() and not p.name.startswith("__")]
    raise DownloadError(located(folder, f"no {split} data in the zip (no annotations.json, no action_<n>/ folders)",
                                "download the zip again; check that it is an MVFouls split zip"))


def unpack(zip_path: Path, out: Path, split: str, force: bool = False) -> Path:
    """Unpack a split zip into ``out/<split>`` atomically; returns that folder.

    The zip is unpacked into a hidden temporary folder in `out` (same file system), then the split's folder is
    renamed into place; any failure removes the temporary folder, so ``out/<split>`` is either the whole split or
    absent (or the previous complete copy)."""
    target = out / split
    if target.exists() and not force:
        raise DownloadError(located(target, "already exists", "pass --force to replace it, or use another --out"))
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DownloadError(located(zip_path, f"not a readable zip ({exc})",
                                    "delete it and run the command again to download it anew")) from None
    tmp = out / f".{split}.partial-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        with archive:
            infos = _members(archive, zip_path)
            check_free_space(out, sum(i.file_size for i in infos), f"unpack {zip_path.name}")
            tmp.mkdir(parents=True)
            from tqdm import tqdm

            with tqdm(total=sum(i.file_size for i in infos), unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"unpacking {zip_path.name}", disable=len(infos) < 50) as bar:
                for info in infos:
                    archive.extract(info, tmp)     # reads through the CRC check: a damaged member raises
                    bar.update(info.file_size)
        root = _split_root(tmp, split)
        if target.exists():
            old = out / f".{split}.old-{uuid.uuid4().hex[:6]}"
            os.replace(target, old)
            os.replace(root, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(root, target)
        return target
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise DownloadError(located(zip_path, f"the zip is damaged ({exc})",
                                    "delete it and run the command again to download it anew")) from None
    except OSError as exc:
        if exc.errno == 28:      # ENOSPC: another process filled the disk meanwhile
            raise DownloadError(located(out, f"disk full while unpacking {zip_path.name}",
                                        "free space (see the sizes above) and run the command again")) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- validation -----------------------------------------------------------------------------------------------
@dataclass
class SplitReport:
    split: str
    total: int
    kept: int
    dropped: dict[str, int]
    counts: dict[str, list[int]] | None


def validate(out: Path, splits: list[str]) -> list[SplitReport]:
    """Load each split with the project's loader (official filter, every clip on disk) and count what it keeps."""
    from ..labels import TASKS
    from .annotations import load_split

    reports = []
    for split in splits:
        sa = load_split(out, split)
        counts = ({task: [int(c) for c in sa.class_counts(task)] for task in TASKS} if sa.labelled else None)
        reports.append(SplitReport(split, sa.total, len(sa), dict(sa.dropped), counts))
    return reports


def format_reports(reports: list[SplitReport]) -> str:
    """Kept counts per split and class next to the published ones, then the filter's drops per rule."""
    from ..labels import ACTION_CLASSES, SEVERITY_CLASSES

    lines = []
    for r in reports:
        pub = PUBLISHED.get(r.split, {})
        lines.append(f"{r.split}: kept {r.kept} of {r.total} actions (published: kept {pub.get('kept', '?')} "
                     f"of {pub.get('total', '?')}){'  MISMATCH' if pub and (r.kept, r.total) != (pub['kept'], pub['total']) else ''}")
        if r.counts:
            for task, names in (("severity", SEVERITY_CLASSES), ("action", ACTION_CLASSES)):
                published = pub.get(task)
                cells = []
                for i, name in enumerate(names):
                    ref = "?" if not published else str(published[i])
                    flag = "" if not published or published[i] == r.counts[task][i] else " !"
                    cells.append(f"{name} {r.counts[task][i]} ({ref}){flag}")
                lines.append(f"  {task:8s}: " + ", ".join(cells))
        drops = [f"{n} {RULE_TEXT.get(rule, rule)}" for rule, n in r.dropped.items() if n]
        if drops:
            lines.append(f"  dropped by the official filter: {r.total - r.kept} = " + "; ".join(drops))
    lines.append("(in parentheses: the published counts; ! marks a difference)")
    return "\n".join(lines)


# ---- the command ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DownloadOptions:
    """What ``python -m mvfouls_ab.download`` was asked (cli/download.py)."""
    out: str
    splits: tuple[str, ...] = tuple(SPLITS)
    version: str = "224p"
    token: str | None = None          # default: $HF_TOKEN, else the token `hf auth login` stored
    zips: str | None = None           # default: OUT/.zips
    keep_zips: bool = False
    zips_only_local: bool = False     # --offline: unpack zips already in `zips`
    force: bool = False
    revision: str = "main"
    endpoint: str | None = None


def run(opts: DownloadOptions) -> list[SplitReport]:
    """Fetch, unpack and validate the splits; returns the validation reports."""
    out = Path(opts.out).expanduser().resolve()
    zips = Path(opts.zips).expanduser().resolve() if opts.zips else out / ".zips"
    splits = list(dict.fromkeys(opts.splits))
    folders = [SPLITS[s] for s in splits]
    todo = [(s, SPLITS[s]) for s in splits if opts.force or not (out / SPLITS[s]).exists()]
    for s, folder in [(s, SPLITS[s]) for s in splits if (s, SPLITS[s]) not in todo]:
        print(f"{folder}: {out / folder} exists, kept (--force replaces it)")
    if todo:
        token = None if opts.zips_only_local else resolve_token(opts.token)
        for s, folder in todo:
            name = zip_name(s, opts.version)
            local = zips / name
            if opts.zips_only_local:
                if not local.is_file():
                    raise DownloadError(located(local, "zip not found", "put the downloaded zip there, or drop "
                                                "--offline to fetch it from the Hub"))
                path = local
            else:
                print(f"{folder}: fetching {REPO_ID}/{name} into {zips}", flush=True)
                t0 = time.perf_counter()
                path = fetch_zip(name, zips, token, opts.revision, opts.endpoint)
                print(f"{folder}: {path.name} {_size(path.stat().st_size)} in {time.perf_counter() - t0:.0f} s",
                      flush=True)
            unpack(path, out, folder, force=opts.force)
            print(f"{folder}: unpacked into {out / folder}", flush=True)
            if not opts.keep_zips and not opts.zips_only_local:
                path.unlink(missing_ok=True)
    reports = validate(out, folders)
    print(format_reports(reports))
    print(f"data root: {out}  (python -m mvfouls_ab.study --data {out} ...)")
    return reports
