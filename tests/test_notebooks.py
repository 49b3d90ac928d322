"""Both analysis notebooks, executed top to bottom (nbclient) against the native stack's MLflow server and Optuna
storage (the session fixture of tests/native_stack.py), with their parameters given as environment variables."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
PLOTLY = "application/vnd.plotly.v1+json"

pytestmark = pytest.mark.slow


def execute(name: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for key, value in env.items():
        monkeypatch.setenv(key, value)        # the kernel inherits the environment; the parameters cell reads it
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    first = nb.cells[[c.cell_type for c in nb.cells].index("code")]
    assert "parameters" in first.metadata.get("tags", []), "the first code cell holds the parameters"
    assert all(f'os.environ.get("{k}"' in first.source for k in env), "every parameter is overridable"
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o["data"][PLOTLY] for o in outputs if o.output_type == "display_data" and PLOTLY in o.get("data", {})]
    return nb, outputs, figures


def rows(array) -> int:
    """Length of a plotly JSON array: a list, or (plotly >= 6) a typed array {"dtype", "bdata", "shape"}."""
    if isinstance(array, dict):
        return int(str(array.get("shape", len(array))).split(",")[0])
    return len(array)


def titles(figures: list[dict]) -> list[str]:
    out = []
    for fig in figures:
        title = fig.get("layout", {}).get("title", {})
        out.append(title.get("text", "") if isinstance(title, dict) else str(title))
    return out


def test_compare_variants_notebook(native_stack, monkeypatch, tmp_path):
    env = {"MVFOULS_TRACKING_URI": native_stack.tracking_uri, "MVFOULS_EXPERIMENTS": native_stack.study_name}
    _, outputs, figures = execute("compare_variants.ipynb", env, monkeypatch, tmp_path)
    names = titles(figures)
    for expected in ("macro recall per variant", "macro recall per recipe", "recall per class and variant",
                     "Confusion matrices", "Learning curves"):
        assert any(expected in n for n in names), (expected, names)
    heatmaps = [t for f in figures for t in f["data"] if t["type"] == "heatmap"]
    assert any(rows(t["z"]) == 8 for t in heatmaps) and any(rows(t["z"]) == 4 for t in heatmaps)
    curves = next(f for f, n in zip(figures, names) if "Learning curves" in n)
    assert max(rows(t["x"]) for t in curves["data"]) == native_stack.epochs_per_trial
    text = "".join(str(o.get("text", "")) for o in outputs)
    assert "FINISHED" in text


def test_study_analysis_notebook(native_stack, monkeypatch, tmp_path):
    env = {"MVFOULS_STORAGE": native_stack.storage, "MVFOULS_STUDY_NAME": native_stack.study_name}
    _, _, figures = execute("study_analysis.ipynb", env, monkeypatch, tmp_path)
    names = titles(figures)
    for expected in ("Optimization History", "Hyperparameter Importances", "Targets met on Valid",
                     "meeting each target", "Timeline"):
        assert any(expected.lower() in n.lower() for n in names), (expected, names)
    history = next(f for f, n in zip(figures, names) if "Optimization History" in n)
    points = sum(rows(t["x"]) for t in history["data"] if t.get("mode") == "markers")   # feasible + infeasible
    assert points >= native_stack.trials, [(t.get("name"), t.get("mode")) for t in history["data"]]
