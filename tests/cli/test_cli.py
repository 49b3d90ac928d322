"""`mvfouls-ab <command>`: the console script lists every command and runs each as `python -m mvfouls_ab.<command>`;
the commands of this package's own parsers show their defaults in --help."""
from __future__ import annotations

import re
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mvfouls_ab import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("study", "train", "ab", "rank", "report", "evaluate", "synth", "download", "predict"):
        assert f"  {name} " in out, name
    assert cli.main([]) == 2                        # no command: the listing, and a usage error


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["nope"])
    assert exc.value.code == 2 and "unknown command 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_help_runs(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")


@pytest.mark.parametrize("command, needles", [
    ("study", ["(default: 50)", "(default: sqlite:///optuna.db)", "(default: sqlite:///mlflow.db)"]),
    ("train", ["(default: sqlite:///mlflow.db)", "(default: mvfouls-train)"]),
    ("download", ["(default: 224p)", "(default: main)"]),
    ("predict", ["(default: Test)", "(default: predictions.json)", "(default: auto)"]),
])
def test_help_shows_defaults_and_no_internal_names(command, needles, capsys):
    assert cli.main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for needle in needles:
        assert needle in out, (needle, out)
    for internal in ("DEFAULT_SEARCH_SPACE", "config.PROFILES", "--worker-index"):
        assert internal not in out, internal


def test_command_exit_codes_pass_through(tmp_path, capsys):
    assert cli.main(["evaluate", "--annotations", str(tmp_path / "no.json"), "--predictions",
                     str(tmp_path / "no.json")]) == 2


def test_console_script_is_installed():
    exe = shutil.which("mvfouls-ab") or str(__import__("pathlib").Path(sys.executable).with_name("mvfouls-ab"))
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "  predict " in proc.stdout and "  download " in proc.stdout


README = Path(__file__).resolve().parents[2] / "README.md"
DOCUMENTED = sorted(set(re.findall(r"python -m (mvfouls_ab\.[a-z_]+)", README.read_text())))


def test_the_readme_documents_every_command():
    assert {f"mvfouls_ab.{name}" for name in cli.COMMANDS} <= set(DOCUMENTED)


@pytest.mark.parametrize("module", DOCUMENTED)
def test_every_documented_python_m_command_still_runs(module, monkeypatch, capsys):
    """`python -m mvfouls_ab.<command>` as the README writes it: the module (a shim for the command in cli/) runs
    as __main__ and prints its usage."""
    monkeypatch.setattr(sys, "argv", [module, *(["replay"] if module.endswith(".tracking") else []), "--help"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
        with pytest.raises(SystemExit) as exc:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exc.value.code in (0, None)
    assert capsys.readouterr().out.startswith("usage: ")
