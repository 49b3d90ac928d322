"""``python -m mvfouls_ab.download --out DIR`` (= ``mvfouls-ab download``): the real MVFouls data set from its gated
Hugging Face repo, unpacked and validated (data/download.py)."""
from __future__ import annotations

import argparse
import os
import sys

from ..data import download
from ..data.download import SPLITS, VERSIONS, DownloadOptions
from ..errors import MVFoulsError
from . import HelpFormatter, fail, script


def build_parser() -> argparse.ArgumentParser:
    doc = download.__doc__
    p = argparse.ArgumentParser(prog="python -m mvfouls_ab.download", description=doc.split("\n\n")[0],
                                epilog=doc.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="data root to create: Train/ Valid/ Test/ Chall/ go there")
    p.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS), help="splits to fetch")
    p.add_argument("--version", choices=VERSIONS, default="224p",
                   help="video release: 224p (398x224, ~2.5 GB of zips) or 720p (much larger)")
    p.add_argument("--token", default=None, help="Hugging Face token (default: $HF_TOKEN, else `hf auth login`'s)")
    p.add_argument("--zips", default=None, help="folder for the downloaded zips (default: OUT/.zips)")
    p.add_argument("--keep-zips", action="store_true", help="keep the zips after unpacking")
    p.add_argument("--offline", dest="zips_only_local", action="store_true",
                   help="do not contact the Hub: unpack zips already in --zips")
    p.add_argument("--force", action="store_true", help="replace split folders that exist already")
    p.add_argument("--revision", default="main", help="repo revision (branch, tag or commit)")
    p.add_argument("--endpoint", default=os.environ.get("HF_ENDPOINT") or None,
                   help="Hub endpoint (default: $HF_ENDPOINT, else https://huggingface.co)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        download.run(DownloadOptions(**{**vars(args), "splits": tuple(args.splits)}))
    except MVFoulsError as exc:
        return fail(exc)
    except KeyboardInterrupt:
        print("interrupted (run the same command again: the download resumes)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    script(main)
