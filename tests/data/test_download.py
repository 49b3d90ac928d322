"""python -m mvfouls_ab.download, offline: split zips the tests build (three layouts), unpacked atomically and validated
with the project's loader; a local HTTP server speaking the Hub's file protocol for the download itself and for a
gated repo; one clear error (exit 2) for no token, no access, a damaged zip, an unsafe entry and a full disk."""
from __future__ import annotations

import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from mvfouls_ab.cli import download as download_cli
from mvfouls_ab.data import download

SPLIT_ZIPS = {"Train": "train.zip", "Valid": "valid.zip", "Test": "test.zip", "Chall": "challenge.zip"}


def build_zip(src: Path, zip_path: Path, prefix: str) -> Path:
    """Zip the split folder `src` with every entry under `prefix` ("" = at the zip's root)."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                archive.write(path, f"{prefix}{path.relative_to(src).as_posix()}")
    return zip_path


@pytest.fixture(scope="module")
def zips(tiny_mvfouls, tmp_path_factory) -> Path:
    """One zip per split, in the layouts a release may use: entries at the root, under the split's folder, under
    a lower-case folder two levels down."""
    d = tmp_path_factory.mktemp("zips")
    prefixes = {"Train": "Train/", "Valid": "", "Test": "mvfouls/test/", "Chall": "Chall/"}
    for split, name in SPLIT_ZIPS.items():
        build_zip(tiny_mvfouls / split, d / name, prefixes[split])
    return d


def run(*args: str) -> int:
    return download_cli.main(list(args))


def test_unpacks_every_layout_and_validates_against_the_published_counts(zips, tmp_path, capsys):
    out = tmp_path / "mvfouls"
    assert run("--out", str(out), "--zips", str(zips), "--offline") == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["Chall", "Test", "Train", "Valid"]   # nothing else left
    assert (out / "Train" / "annotations.json").is_file() and (out / "Test" / "action_0" / "clip_0.mp4").is_file()
    assert "Train: kept 8 of 11 actions (published: kept 2319 of 2916)" in printed
    assert "Offence + Red card 1 (27)" in printed and "Dive 1 (28)" in printed
    assert 'Action class is "" or "Dont know"' in printed and "dropped by the official filter: 3" in printed
    assert "Chall: kept 8 of 8 actions" in printed
    # again: existing splits are kept, not unpacked twice; --force replaces one
    assert run("--out", str(out), "--zips", str(zips), "--offline", "--splits", "test") == 0
    assert "exists, kept" in capsys.readouterr().out
    assert run("--out", str(out), "--zips", str(zips), "--offline", "--splits", "test", "--force") == 0
    assert (out / "Test" / "annotations.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("DownloadError: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_damaged_zip_leaves_nothing_half_unpacked(zips, tmp_path, capsys):
    bad = tmp_path / "zips"
    bad.mkdir()
    data = bytearray((zips / "test.zip").read_bytes())
    with zipfile.ZipFile(zips / "test.zip") as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF                 # flip a byte inside the largest member
    (bad / "test.zip").write_bytes(bytes(data))
    out = tmp_path / "out"
    assert run("--out", str(out), "--zips", str(bad), "--offline", "--splits", "test") == 2
    _one_line_error(capsys, "test.zip", "damaged", "download it anew")
    assert list(out.iterdir()) == []                             # no Test/, no hidden partial folder

    (bad / "test.zip").write_bytes(b"not a zip at all")
    assert run("--out", str(out), "--zips", str(bad), "--offline", "--splits", "test") == 2
    _one_line_error(capsys, "not a readable zip")


def test_entry_outside_the_folder_is_refused(tmp_path, capsys):
    zdir = tmp_path / "zips"
    zdir.mkdir()
    with zipfile.ZipFile(zdir / "test.zip", "w") as archive:
        archive.writestr("Test/annotations.json", "{}")
        archive.writestr("../../escape.txt", "x")
    assert run("--out", str(tmp_path / "out"), "--zips", str(zdir), "--offline", "--splits", "test") == 2
    _one_line_error(capsys, "points outside")
    assert not (tmp_path / "escape.txt").exists()


def test_full_disk_is_checked_before_unpacking(zips, tmp_path, capsys, monkeypatch):
    # Ask for more headroom than any disk has: the real free space is then short of the zip's uncompressed size.
    monkeypatch.setattr(download, "DISK_MARGIN", 1 << 60)
    out = tmp_path / "out"
    assert run("--out", str(out), "--zips", str(zips), "--offline", "--splits", "train") == 2
    _one_line_error(capsys, "not enough disk space to unpack train.zip", "free")
    assert list(out.iterdir()) == []


def test_no_token_says_how_to_get_access(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))               # no saved login either
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    assert run("--out", str(tmp_path / "out"), "--splits", "test") == 2
    _one_line_error(capsys, "SoccerNet/SN-MVFouls-2024", "no Hugging Face token", "request access",
                    "hf auth login")


# ---- a local server that speaks the Hub's file protocol ---------------------------------------------------------
class FakeHub(http.server.ThreadingHTTPServer):
    """HEAD/GET /datasets/<repo>/resolve/<rev>/<file> like huggingface.co: commit and etag headers, ranges for a
    resumed download; `gated` answers 403 GatedRepo as the Hub does for an account without access."""

    def __init__(self, files: dict[str, bytes], gated: bool = False) -> None:
        self.files, self.gated, self.gets = files, gated, 0
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        return None

    def _file(self) -> bytes | None:
        prefix = f"/datasets/{download.REPO_ID}/resolve/main/"
        if self.server.gated:
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to dataset is restricted. You must have access to it.")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        body = self.server.files.get(self.path[len(prefix):]) if self.path.startswith(prefix) else None
        if body is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
        return body

    def _headers(self, body: bytes, status: int, length: int) -> None:
        self.send_response(status)
        self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_HEAD(self) -> None:
        body = self._file()
        if body is not None:
            self._headers(body, 200, len(body))

    def do_GET(self) -> None:
        body = self._file()
        if body is None:
            return
        self.server.gets += 1
        start = 0
        if (rng := self.headers.get("Range", "")).startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
        self._headers(body, 206 if start else 200, len(body) - start)
        self.wfile.write(body[start:])


@pytest.fixture
def hub(zips):
    server = FakeHub({name: (zips / name).read_bytes() for name in ("test.zip", "challenge.zip")})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_downloads_from_the_hub_then_unpacks_and_validates(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    out = tmp_path / "out"
    code = run("--out", str(out), "--splits", "test", "challenge", "--token", "hf_test", "--endpoint", hub.url)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert (out / "Test" / "annotations.json").is_file() and (out / "Chall" / "action_0").is_dir()
    assert "Test: kept 8 of 11 actions (published: kept 251 of 301)" in printed.out
    assert not (out / ".zips" / "test.zip").exists()                 # zips are removed once unpacked
    assert hub.gets == 2

    hub.gated = True
    assert run("--out", str(tmp_path / "o2"), "--splits", "test", "--token", "hf_test", "--endpoint", hub.url) == 2
    _one_line_error(capsys, "no access to this gated repo", "Request access", download.REPO_URL)

    hub.gated = False
    assert run("--out", str(tmp_path / "o3"), "--splits", "train", "--token", "hf_test", "--endpoint", hub.url) == 2
    _one_line_error(capsys, "train.zip", "no such file in the repo")
