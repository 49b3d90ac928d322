"""The champion model end to end: a study on the tiny data set registers its best trial as mvfouls-<study>@champion;
`python -m mvfouls_ab.predict` loads it in a new process and rewrites the best trial's Test file byte for byte (and
the Chall file plus the challenge zip); each bad input is one clear error; the MLflow UI in headless Chromium opens
the study's experiment on its runs table."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mvfouls_ab.cli import predict as predict_mod
from mvfouls_ab.cli import study as study_cli
from mvfouls_ab.modelpack import CHAMPION_ALIAS, ModelPack, ModelPackError, register_champion, registered_name
from mvfouls_ab.orchestration import study as study_mod

SPACE = """
fixed: {num_phases: 3, phase1_epochs: 1, phase2_epochs: 1, phase3_epochs: 1, batch_size: 4, hidden_dim: 32,
        curriculum: false}
params:
  variant: {type: categorical, choices: [simplified, optimized]}
  phase2_lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
"""
FAST = ["feature_mode=frozen", "backbone=small3d", "frame_width=0", "frame_size=32", "num_frames=8",
        "rep_holdout=0.0"]


@pytest.fixture(scope="module")
def champion(tmp_path_factory, tiny_mvfouls):
    d = tmp_path_factory.mktemp("champion")
    (d / "space.yaml").write_text(SPACE)
    cache = d / "cache"
    tracking = f"sqlite:///{d}/mlflow.db"
    args = study_cli.parse_args([
        "--trials", "2", "--study-name", "champ", "--storage", f"sqlite:///{d}/optuna.db", "--tracking-uri", tracking,
        "--data", str(tiny_mvfouls), "--search-space", str(d / "space.yaml"), "--pruner", "none",
        "--out", str(d / "runs"), "--threads", "1", "--quiet", "--set", f"cache_dir={cache}", *FAST])
    result = study_mod.run(args)
    return {"dir": d, "tracking": tracking, "cache": cache, "data": tiny_mvfouls, "result": result}


def run_predict(champion, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MVFOULS_AB_CACHE": str(champion["cache"]), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mvfouls_ab.predict", *args], capture_output=True, text=True,
                          timeout=300, cwd=champion["dir"], env=env, check=False)


@pytest.mark.slow
def test_study_registers_the_best_trial_as_champion(champion):
    result, client = champion["result"], MlflowClient(champion["tracking"])
    name = registered_name("champ")
    version = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    best = result["study"].trials[result["best"]]
    assert version.run_id == best.user_attrs["mlflow_run_id"] == result["champion"]["run_id"]
    assert version.tags["trial"] == str(result["best"])
    # every finished trial logged its model; the registered one is the best trial's
    for trial in result["study"].trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert [m.model_id for m in run.outputs.model_outputs] == [run.data.tags["mlflow_model_id"]]
        assert run.info.run_name == f"trial-{trial.number:04d}-{trial.params['variant']}"
    # registering again keeps the version; another run becomes champion and the previous keeps its version
    assert register_champion(client, name, version.run_id).version == version.version
    other = next(t for t in result["study"].trials if t.number != result["best"])
    moved = register_champion(client, name, other.user_attrs["mlflow_run_id"])
    assert moved.version != version.version
    assert client.get_model_version_by_alias(name, CHAMPION_ALIAS).version == moved.version
    assert client.get_model_version(name, version.version).run_id == version.run_id
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)       # back, for the tests below


@pytest.mark.slow
def test_predict_with_the_champion_reproduces_the_best_trial(champion, tmp_path, monkeypatch):
    from SoccerNet.Evaluation.MV_FoulRecognition import evaluate

    result, name = champion["result"], registered_name("champ")
    out = tmp_path / "predictions_test.json"
    proc = run_predict(champion, "--model", f"models:/{name}@{CHAMPION_ALIAS}", "--data", str(champion["data"]),
                       "--split", "Test", "--out", str(out), "--tracking-uri", champion["tracking"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    best_file = Path(result["test"]["predictions"])
    assert best_file.name == f"best_trial_{result['best']:04d}_predictions_test.json"
    assert out.read_bytes() == best_file.read_bytes()
    gt = champion["data"] / "Test" / "annotations.json"
    assert evaluate(str(gt), str(out)) == evaluate(str(gt), str(best_file))
    assert "Test: official leaderboard" in proc.stdout

    # Chall: the prediction file and the zip the challenge server takes; the run folder as --model, URI from env
    chall = tmp_path / "chall" / "predictions_chall.json"
    run_dir = result["study"].trials[result["best"]].user_attrs["run_dir"]
    monkeypatch.setenv("MVFOULS_AB_CACHE", str(champion["cache"]))
    assert predict_mod.main(["--model", run_dir, "--data", str(champion["data"]), "--split", "Chall",
                             "--out", str(chall)]) == 0
    assert chall.read_bytes() == (Path(run_dir) / "predictions_chall.json").read_bytes()
    with zipfile.ZipFile(chall.with_suffix(".zip")) as archive:
        assert archive.namelist() == [chall.name]
        assert json.loads(archive.read(chall.name)) == json.loads(chall.read_text())


@pytest.mark.slow
def test_bad_inputs_are_one_clear_error(champion, tmp_path, capsys):
    def fails(*args: str, needles: tuple[str, ...]) -> None:
        code = predict_mod.main([*args, "--out", str(tmp_path / "p.json")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        for needle in needles:
            assert needle in err, err

    data = str(champion["data"])
    fails("--model", "models:/mvfouls-nope@champion", "--data", data, "--tracking-uri", champion["tracking"],
          needles=("models:/mvfouls-nope@champion", "cannot load the model", "--tracking-uri"))
    fails("--model", str(tmp_path), "--data", data, needles=("no MLflow model in this folder",))
    run_dir = champion["result"]["study"].trials[0].user_attrs["run_dir"]
    no_chall = tmp_path / "no_chall"
    no_chall.mkdir()
    for split in ("Train", "Valid", "Test"):
        (no_chall / split).symlink_to(champion["data"] / split)
    fails("--model", run_dir, "--data", str(no_chall), "--split", "Chall", needles=("Chall", "split folder not found"))

    # clips of another release (another frame size): the model's features would not match the data
    from conftest import make_tiny_dataset

    other = make_tiny_dataset(tmp_path / "720p", n_per_split=2, size=(96, 54), splits=("Test",), dropped=False)
    fails("--model", run_dir, "--data", str(other), needles=("feature key mismatch", "64x36", "96x54"))

    # a model whose backbone version is not the installed code's
    pack = tmp_path / "pack"
    shutil.copytree(Path(run_dir) / "mlflow_model" / "artifacts" / "pack", pack)
    meta = json.loads((pack / "pack.json").read_text())
    meta["backbone"]["version"] = "0-old"
    (pack / "pack.json").write_text(json.dumps(meta))
    with pytest.raises(ModelPackError, match="feature key mismatch.*version 0-old"):
        ModelPack.load(pack).check_code()


@pytest.mark.slow
def test_mlflow_ui_opens_the_study_on_its_runs_table(champion, tmp_path):
    """The study's experiment in the real MLflow UI (mlflow server on the study's store), rendered by headless
    Chromium at the URL the study prints: the runs table (Model training), not the GenAI overview."""
    from pg import MlflowServer

    from mvfouls_ab.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, experiment_url

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed: apt-get install -y chromium (.ci/run installs it)"
    exp = MlflowClient(champion["tracking"]).get_experiment_by_name("champ")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    server = MlflowServer(champion["tracking"], tmp_path).start()
    try:
        url = experiment_url(server.url, exp.experiment_id)
        proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                               "--disable-component-update", "--no-first-run", "--disable-sync",
                               f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=20000",
                               "--window-size=1600,1000", "--dump-dom", url],
                              capture_output=True, text=True, timeout=180, check=False)
    finally:
        server.stop()
    dom = proc.stdout
    assert "Run Name" in dom and "matching runs" in dom, dom[-3000:]
    assert "study-champ" in dom                                 # the parent run row (trials nest under it)
    assert "Token Usage" not in dom and "Detect Issues" not in dom     # not the GenAI overview page
