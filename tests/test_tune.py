"""`sparta tune`: the search space, the plan's refusals, and real studies on a tiny BERT (a few
optimizer steps per trial): pruning, the study folder, best.yaml's exact rerun, resuming after
kill -9, and two workers on one storage."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import import_or_require

from sparta_cli.config import load_recipe
from sparta_cli.errors import SpartaError
from sparta_cli.tune.space import as_override, decode, parse_param, parse_space_flag
from sparta_cli.tune.study import identity_differences, is_stale, read_plan, require_optuna, retries

optuna = import_or_require("optuna", allow_module_level=True)  # CI installs it (setup.sh --dev): a skip there fails
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the space and the plan (no training)


def test_space_specs_parse_to_the_distributions_they_name():
    density = parse_param("adapter.density", "log:1e-3..0.2")
    assert (density.low, density.high, density.log, density.integer) == (1e-3, 0.2, True, False)
    epochs = parse_param("training.epochs", "1..3")
    assert epochs.integer and epochs.distribution().high == 3
    targets = parse_param("adapter.targets", [["v", "o"], ["q", "k", "v", "o"]])
    stored = targets.distribution().choices
    assert stored == ("[v, o]", "[q, k, v, o]")  # Optuna's choices are scalars: lists travel as YAML
    assert decode(targets, stored[1]) == ["q", "k", "v", "o"]
    assert parse_param("training.lr", {"low": 1e-5, "high": 1e-2, "log": True}).log
    assert parse_space_flag("adapter.targets=[[v, o], [q, v]]") == ("adapter.targets", [["v", "o"], ["q", "v"]])
    assert as_override("adapter.targets", ["v", "o"]) == "adapter.targets=[v, o]"
    assert as_override("training.lr", 1e-05) in ("training.lr=1.0e-05", "training.lr=1e-05")


@pytest.mark.parametrize("spec, fragment", [("0.2..1e-3", "low end must be below"), ("log:0..1", "above 0"),
                                            ("lots", "give a range"), ([], "empty"), ({"low": 1}, "numbers")])
def test_malformed_specs_are_one_line_errors_naming_the_fix(spec, fragment):
    with pytest.raises(SpartaError, match=fragment):
        parse_param("adapter.density", spec)


def _recipe(tmp_path: Path, model: str, data_dir: Path, **tune) -> Path:
    """SST-2, 48 training rows of which 16 held out for validation: 4 steps of 8, evaluated every 2."""
    recipe = {
        "model": {"name_or_path": str(model)},
        "adapter": {"method": "sparta", "density": 0.05, "targets": ["v", "o"]},
        "task": {"name": "sst2"},
        "data": {"dir": str(data_dir), "max_length": 32, "max_train_samples": 48, "max_eval_samples": 16, "validation_size": 16},
        "training": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "lr": 1e-3, "eval_every": 2, "log_every": 1,
                     "best_metric": "loss"},
        "seed": 3,
        "tune": {"output_dir": str(tmp_path / "study"), **tune},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_study_started_before_a_recipe_key_existed_is_still_this_study():
    recipe = load_recipe(REPO / "configs" / "quickstart.yaml").to_dict()
    ours = {"recipe": recipe, "space": {"training.lr": "log(1e-4,1e-2)"}, "metric": "eval_loss", "direction": "minimize"}
    old = json.loads(json.dumps(ours))
    del old["recipe"]["data"]["packing"]
    assert identity_differences(ours, old) == []
    old["recipe"]["data"]["max_length"], old["metric"] = 7, "eval_accuracy"
    assert identity_differences(ours, old) == ["recipe.data.max_length", "metric"]


def test_a_study_without_a_validation_set_is_refused_with_the_fix(tmp_path, data_dir):
    from sparta_cli.tune.settings import plan_study

    path = _recipe(tmp_path, "unused", data_dir)
    with pytest.raises(SpartaError, match="data.validation_size=0.1"):
        plan_study(path, ["data.validation_size=null", "training.best_metric=null"])


def test_bad_tune_settings_fail_before_any_trial(tmp_path, data_dir):
    from sparta_cli.tune.settings import plan_study

    path = _recipe(tmp_path, "unused", data_dir)
    with pytest.raises(SpartaError, match="did you mean `tune.trials`"):
        plan_study(path, ["tune.trails=3"])
    with pytest.raises(SpartaError, match="unknown key `adapter.densty`"):  # every searched key must be a recipe key
        plan_study(path, [], space_flags=["adapter.densty=log:1e-3..0.1"])
    with pytest.raises(SpartaError, match="adapter.density"):  # the high end must be a valid density
        plan_study(path, [], space_flags=["adapter.density=0.1..2.0"])
    with pytest.raises(SpartaError, match="grid needs a list of choices"):
        plan_study(path, ["tune.sampler=grid"])
    plan, workers = plan_study(path, ["tune.trials=4"], {"workers": 2})
    assert (plan.trials, workers, plan.metric, plan.direction) == (4, 2, "loss", "minimize")
    assert set(plan.space) == {"adapter.density", "training.lr"}  # SpaRTA's defaults


def test_a_grid_study_runs_to_its_last_point(tmp_path, data_dir):
    """Workers ask and tell outside `study.optimize`: Optuna's grid asks for `study.stop()` when its last
    point is told, which raised there (after storing it) and crashed the worker at the grid's end."""
    from sparta_cli.tune.settings import plan_study
    from sparta_cli.tune.study import make_sampler
    from sparta_cli.tune.worker import suggest

    path = _recipe(tmp_path, "unused", data_dir)
    plan, _ = plan_study(path, ["tune.sampler=grid"], space_flags=["adapter.density=[0.01, 0.05]", "training.lr=[0.001, 0.01]"])
    study = optuna.create_study(sampler=make_sampler(plan, 0, False, 0))
    for _ in range(4):
        trial = study.ask()
        study.tell(trial, suggest(trial, plan)["training.lr"])
    assert sorted((t.params["adapter.density"], t.params["training.lr"]) for t in study.trials) == [
        (0.01, 0.001), (0.01, 0.01), (0.05, 0.001), (0.05, 0.01)]


def test_missing_optuna_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(SpartaError, match=r"pip install 'sparta\[tune\]'"):
        require_optuna()


def test_a_running_trial_whose_process_is_gone_is_stale():
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING,
                                      user_attrs={"host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()})
    assert is_stale(trial)
    trial.user_attrs["pid"] = os.getpid()
    assert not is_stale(trial)
    trial.user_attrs.update(host="elsewhere", heartbeat=time.time() - 3600)  # another machine, silent for an hour
    assert is_stale(trial)


def test_workers_get_one_gpu_each_or_a_share_of_the_cores(monkeypatch):
    from sparta_cli.tune.run import worker_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [worker_env(i, 3, ["4", "6"])["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["4", "6", "4"]
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    env = worker_env(0, 2, [])
    assert env["OMP_NUM_THREADS"] == "4" and env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert worker_env(0, 2, [])["OMP_NUM_THREADS"] == "1"  # the user's setting wins


# ---------------------------------------------------------------- real studies


def _study(plan_dir: Path):
    from sparta_cli.tune.study import open_study

    return open_study(read_plan(plan_dir))


def _states(study) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def test_a_study_prunes_a_bad_region_writes_its_folder_and_best_yaml_reruns_the_best_trial(tmp_path, data_dir, tiny_bert_dir):
    """Two good rates first, then lr 10 and 12: once two trials finished, the median pruner stops the
    bad ones at their first evaluation (validation loss far above the others')."""
    from sparta_cli.config import load_recipe
    from sparta_cli.fileio import read_json
    from sparta_cli.train import train
    from sparta_cli.tune.run import tune

    path = _recipe(tmp_path, tiny_bert_dir, data_dir, trials=4, pruner_startup_trials=2, space={"training.lr": "log:1e-4..20"},
                   enqueue=[{"training.lr": 1e-3}, {"training.lr": 3e-3}, {"training.lr": 10.0}, {"training.lr": 12.0}])
    summary = tune(path)
    folder = tmp_path / "study"
    study = _study(folder)
    trials = study.get_trials(deepcopy=False)
    assert [t.params["training.lr"] for t in trials] == [1e-3, 3e-3, 10.0, 12.0]
    assert [t.state.name for t in trials[:2]] == ["COMPLETE", "COMPLETE"]
    for bad in trials[2:]:  # stopped by the pruner at its first evaluation, not by a diverged loss
        assert bad.state.name == "PRUNED" and bad.user_attrs["pruned_at_step"] == 2 and "failure" not in bad.user_attrs
        assert not (Path(bad.user_attrs["run_dir"]) / "all_results.json").exists()
    assert summary["trials"] == {"complete": 2, "pruned": 2, "fail": 0, "running": 0}

    rows = (folder / "trials.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("trial,state,validation_loss,training.lr")
    assert not [c for c in rows[0].split(",") if c.startswith("test_")]  # test scores never sit beside the candidates
    for name in ("trials.md", "history.png", "params.png", "summary.json"):
        assert (folder / name).is_file(), name
    best = min(trials[:2], key=lambda t: t.value)
    assert summary["best"]["trial"] == best.number and set(summary["best"]["test"]) >= {"test_loss", "test_accuracy"}

    # best.yaml is a recipe `sparta train` runs as is, and it reproduces the best trial's validation score exactly
    rerun = train(load_recipe(folder / "best.yaml"))
    assert rerun == folder / "best"
    assert read_json(rerun / "all_results.json")["eval_loss"] == best.value


@pytest.mark.slow
def test_a_killed_study_resumes_without_rerunning_finished_trials(tmp_path, data_dir, tiny_bert_dir):
    """kill -9 of `sparta tune` and its worker mid-trial; the rerun fails the orphaned trial, runs its
    parameters again as a new trial in its folder, and leaves the finished ones untouched."""
    from sparta_cli.tune.run import tune
    from sparta_cli.tune.study import open_study

    path = _recipe(tmp_path, tiny_bert_dir, data_dir, trials=3, pruner="none")
    folder = tmp_path / "study"
    process = subprocess.Popen([sys.executable, "-m", "sparta_cli", "tune", str(path)], cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    study = None
    try:
        while time.time() < deadline:
            time.sleep(0.5)
            if study is None and (folder / "study.json").is_file() and (folder / "study.journal").is_file():
                study = open_study(read_plan(folder))
            if study is not None:
                trials = study.get_trials(deepcopy=False)
                if any(t.state.name == "COMPLETE" for t in trials) and any(t.state.name == "RUNNING" and "run_dir" in t.user_attrs for t in trials):
                    break
        else:
            pytest.fail("the study never had a finished and a running trial at once")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    time.sleep(0.5)
    before = {t.number: t for t in study.get_trials(deepcopy=True)}
    finished = {n: t for n, t in before.items() if t.state.name == "COMPLETE"}
    killed = [t for t in before.values() if t.state.name == "RUNNING"]
    stamps = {n: (Path(t.user_attrs["run_dir"]) / "all_results.json").stat().st_mtime_ns for n, t in finished.items()}

    tune(path)
    after = _study(folder).get_trials(deepcopy=False)
    for number, trial in finished.items():  # untouched: same value, same files
        assert after[number].state.name == "COMPLETE" and after[number].value == trial.value
        assert (Path(trial.user_attrs["run_dir"]) / "all_results.json").stat().st_mtime_ns == stamps[number]
    for trial in killed:
        old = after[trial.number]
        assert old.state.name == "FAIL"
        retry = retries(after)[trial.number]
        assert retry.state.name == "COMPLETE" and retry.params == trial.params and retry.user_attrs["retry_of"] == trial.number
        assert retry.user_attrs["run_dir"] == trial.user_attrs["run_dir"]  # continued in its folder (no checkpoint: from the start)
    counted = [t for t in after if t.number not in retries(after)]
    assert len(counted) == 3 and all(t.state.name == "COMPLETE" for t in counted)


def test_two_workers_share_one_storage_and_never_run_a_trial_twice(tmp_path, data_dir, tiny_bert_dir):
    from sparta_cli.tune.run import tune

    path = _recipe(tmp_path, tiny_bert_dir, data_dir, trials=4, workers=2, pruner="none")
    tune(path)
    folder = tmp_path / "study"
    trials = _study(folder).get_trials(deepcopy=False)
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)  # the budget, not one more
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4
    for trial in trials:  # each trial trained once, in one process
        log = (folder / "logs" / f"trial-{trial.number:04d}.log").read_text()
        assert log.count("done in") == 1
    assert {t.user_attrs["pid"] for t in trials} <= {int(p) for p in _worker_pids(folder)}


def _worker_pids(folder: Path) -> set[str]:
    """Every pid a trial was run by, as the workers logged it."""
    pids = set()
    for log in (folder / "logs").glob("worker-*.log"):
        pids |= {line.split()[1] for line in log.read_text().splitlines() if line.startswith("pid ")}
    return pids


# ---------------------------------------------------------------- the study folder, the storage, a study with no result (no training)


def _fake_study(monkeypatch, fail: str | None = None):
    """Workers replaced by telling each trial of the budget at once, in this process: a value of 1.0, or
    FAIL with `fail` as its recorded failure, as a worker records it."""
    from sparta_cli.tune import run

    def supervise(study, plan, processes):
        while run.trials_left(study, plan.trials) > 0:
            trial = study.ask()
            if fail is None:
                study.tell(trial, 1.0)
            else:
                trial.set_user_attr("failure", fail)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)

    monkeypatch.setattr(run, "start_workers", lambda plan, workers, shared: [])
    monkeypatch.setattr(run, "supervise", supervise)


def test_a_study_folder_holding_the_users_files_is_refused_and_left_as_it_was(tmp_path, data_dir, monkeypatch):
    from sparta_cli.tune.run import tune

    _fake_study(monkeypatch)
    path = _recipe(tmp_path, "unused", data_dir, trials=2)
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "best.yaml").write_text("my own recipe\n")
    with pytest.raises(SpartaError, match=r"is not a sparta study folder \(it holds `best.yaml`.*give --output a new"):
        tune(path)
    assert sorted(p.name for p in folder.iterdir()) == ["best.yaml"] and (folder / "best.yaml").read_text() == "my own recipe\n"

    (folder / "best.yaml").unlink()
    tune(path)  # an empty folder is the study's
    assert {"study.json", "study.journal", "trials.csv", "best.yaml", "summary.json"} <= {p.name for p in folder.iterdir()}
    (folder / "best").mkdir()  # `sparta train best.yaml` trains there
    tune(path, flags={"trials": 3})  # resumes: every entry is the study's
    assert len(_study(folder).get_trials(deepcopy=False)) == 3

    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(SpartaError, match="holds `notes.txt`, which no sparta study writes"):
        tune(path, flags={"trials": 4})
    (folder / "notes.txt").unlink()
    (folder / "trials.csv").write_text("my,own\n1,2\n")  # a user's table where the study's was
    with pytest.raises(SpartaError, match="holds a `trials.csv` that sparta tune did not write"):
        tune(path, flags={"trials": 4})
    assert (folder / "trials.csv").read_text() == "my,own\n1,2\n"
    assert len(_study(folder).get_trials(deepcopy=False)) == 3  # refused before any trial


def test_a_study_folder_keeps_one_study_and_trial_folders_it_did_not_start(tmp_path, data_dir, monkeypatch):
    from sparta_cli.tune.run import tune

    _fake_study(monkeypatch)
    path = _recipe(tmp_path, "unused", data_dir, trials=1)
    folder = tmp_path / "study"
    tune(path)
    with pytest.raises(SpartaError, match="holds study recipe, not other: .*--study recipe"):
        tune(path, flags={"study": "other"})
    plan = (folder / "study.json").read_text()
    with pytest.raises(SpartaError, match=r"was started with another recipe, space or objective \(recipe.data.max_length differ"):
        tune(path, ["data.max_length=16"])
    assert (folder / "study.json").read_text() == plan  # the workers of a resume read the study's own plan
    # a journal moved aside: trial 0 of the new journal would train into the old trial-0000
    (folder / "trials" / "trial-0000").mkdir(parents=True)
    (folder / "trials" / "trial-0000" / "all_results.json").write_text("{}")
    (folder / "study.journal").rename(tmp_path / "old.journal")
    with pytest.raises(SpartaError, match=r"trial-0000 is not a trial of study recipe .* move .*trials aside"):
        tune(path)
    assert (folder / "trials" / "trial-0000" / "all_results.json").read_text() == "{}"


def test_a_study_where_every_trial_failed_is_a_failure_naming_the_first_error(tmp_path, data_dir, monkeypatch):
    from sparta_cli.errors import RunFailure
    from sparta_cli.tune.run import tune

    _fake_study(monkeypatch, fail="its validation loss is nan")
    path = _recipe(tmp_path, "unused", data_dir, trials=2)
    with pytest.raises(RunFailure, match=r"no trial of study recipe completed \(2 failed, 0 pruned\); the first failure, "
                                         r"trial 0 \(fail\): its validation loss is nan; its log: .*trial-0000.log"):
        tune(path)
    assert (tmp_path / "study" / "trials.csv").is_file()  # the folder still shows the trials


@pytest.mark.parametrize(("journal", "why"), [
    (b'{"op_code": 0, "worker_id": "a", "study_name": "s", "directions": [1]}\n{"op_code": 4, "worker_i', "its last line is cut off"),
    (b"\x00\x01binary\n", "line 1 is not JSON"),
    (b'{"op_code": 0}\nnot json\n{"op_code": 1}\n', "line 2 is not JSON"),
    (b'["a list"]\n', "line 1 is not an Optuna journal record"),
])
def test_a_damaged_journal_names_the_file_and_the_fix_and_leaves_the_trials(tmp_path, journal, why):
    from sparta_cli.tune.study import open_storage

    path = tmp_path / "study.journal"
    path.write_bytes(journal)
    with pytest.raises(SpartaError, match=rf"the study journal {path} is damaged \({why}\): start a fresh study with another "
                                          rf"--study .* or move {path} .* aside"):
        open_storage(str(path))
    assert path.read_bytes() == journal


@pytest.mark.parametrize(("url", "fragment"), [
    ("nosuchdb://host/x", "`nosuchdb` is not a database SQLAlchemy knows"),
    ("mysql+pymysql://u:secret@localhost/x", "needs the database driver `pymysql`, which is not installed: pip install PyMySQL"),
    ("postgresql://u:secret@localhost:notaport/x", "is not a database URL SQLAlchemy can read"),
    ("sqlite:////nonexistent-folder/x/study.db", "cannot open the study storage sqlite:////nonexistent-folder/x/study.db "
                                               "(unable to open database file): check that its server runs"),
])
def test_a_storage_that_cannot_be_opened_says_which_and_what_to_install(url, fragment):
    from sparta_cli.tune.study import open_storage

    with pytest.raises(SpartaError, match=re.escape(fragment)) as raised:
        open_storage(url)
    assert "secret" not in str(raised.value) and "\n" not in str(raised.value)


def test_a_trial_error_naming_a_train_option_gets_tunes_fix(tmp_path):
    from sparta_cli.cli import command_options
    from sparta_cli.tune.worker import in_tune_terms

    told = in_tune_terms(SpartaError("output_dir runs/x is not empty: pass --overwrite to replace it, or set output_dir=..."),
                         3, tmp_path / "trial-0003")
    assert "--overwrite" not in command_options("tune") and "pass --overwrite" not in str(told)
    assert str(told).startswith("trial 3: output_dir runs/x is not empty; sparta tune takes no --overwrite: move ")
    kept = SpartaError("give another --study, or rerun `sparta train x.yaml --resume`")
    assert in_tune_terms(kept, 0, tmp_path) is kept


def test_a_trial_with_a_nan_objective_or_a_train_fix_says_why(tmp_path, data_dir, monkeypatch):
    """The worker's trial loop around a stand-in for train(): a NaN validation metric fails the trial with
    the reason recorded (Optuna alone would fail it silently); a train error naming --overwrite gets tune's fix."""
    import sparta_cli.train
    from sparta_cli.fileio import write_json
    from sparta_cli.tune.run import no_trial_completed
    from sparta_cli.tune.settings import plan_study
    from sparta_cli.tune.worker import run_trial

    plan, _ = plan_study(_recipe(tmp_path, "unused", data_dir, trials=2))
    study = optuna.create_study(direction=plan.direction)

    def nan_run(recipe, **kwargs):
        write_json(Path(recipe.output_dir) / "all_results.json", {"eval_loss": float("nan"), "best_step": 2})
        return Path(recipe.output_dir)

    monkeypatch.setattr(sparta_cli.train, "train", nan_run)
    assert run_trial(study, study.ask(), plan) == "fail"
    assert study.trials[0].state.name == "FAIL" and study.trials[0].user_attrs["failure"].startswith("its validation loss is nan")
    assert "the first failure, trial 0 (fail): its validation loss is nan" in no_trial_completed(study, plan)

    def occupied(recipe, **kwargs):
        raise SpartaError(f"output_dir {recipe.output_dir} is not empty: pass --overwrite to replace it, or set output_dir=...")

    monkeypatch.setattr(sparta_cli.train, "train", occupied)
    with pytest.raises(SpartaError, match=r"^trial 1: output_dir .*trial-0001 is not empty; sparta tune takes no --overwrite: "
                                          r"move .*trial-0001 aside and rerun it, or give --output a new folder$"):
        run_trial(study, study.ask(), plan)
    assert "pass --overwrite" not in study.trials[1].user_attrs["failure"]


def test_the_start_line_prints_a_storage_without_its_password():
    """`sparta tune` prints its storage when it starts: a database URL's password never reaches the log."""
    from sparta_cli.tune.study import shown_url

    assert shown_url("postgresql://ann:s3cret@db.example:5432/studies") == "postgresql://ann:***@db.example:5432/studies"
    assert "s3cret" not in shown_url("mysql+pymysql://root:s3cret@localhost/optuna")
    assert shown_url("/runs/tunes/stsb/journal.log") == "/runs/tunes/stsb/journal.log"


def test_enqueued_points_outside_the_space_a_prefixed_metric_and_grid_with_enqueue_are_settled_before_any_trial(tmp_path, data_dir):
    """An enqueued value not among the choices crashed a worker (and was then dropped); best_metric
    eval_loss, which train takes, became eval_eval_loss; Optuna's grid ran an enqueued point twice."""
    from sparta_cli.tune.settings import plan_study

    path = _recipe(tmp_path, "unused", data_dir)
    targets = ["adapter.targets=[[v, o], [q, k, v, o]]"]
    with pytest.raises(SpartaError, match=r"tune.enqueue gives adapter.targets = \[q, v\], which is not one of its choices"):
        plan_study(path, ["tune.enqueue=[{adapter.targets: [q, v]}]"], space_flags=targets)
    with pytest.raises(SpartaError, match=r"tune.enqueue gives adapter.density = 0.5, outside its range"):
        plan_study(path, ["tune.enqueue=[{adapter.density: 0.5}]"], space_flags=["adapter.density=log:1e-3..0.1"])
    with pytest.raises(SpartaError, match="tune.enqueue does not go with tune.sampler = grid"):
        plan_study(path, ["tune.sampler=grid", "tune.enqueue=[{adapter.density: 0.01}]"], space_flags=["adapter.density=[0.01, 0.05]"])
    plan, _ = plan_study(path, ["training.best_metric=eval_loss", "tune.enqueue=[{adapter.targets: [v, o]}]"], space_flags=targets)
    assert (plan.metric, plan.direction, plan.enqueue) == ("loss", "minimize", [{"adapter.targets": "[v, o]"}])


def test_a_link_inside_the_logs_or_trials_of_a_study_folder_is_refused(tmp_path, data_dir, monkeypatch):
    """Only the folder's own entries were checked: a link at logs/worker-0.log had the workers append to its target."""
    from sparta_cli.tune.run import tune

    _fake_study(monkeypatch)
    path = _recipe(tmp_path, "unused", data_dir, trials=1)
    tune(path)
    folder, victim = tmp_path / "study", tmp_path / "victim.txt"
    victim.write_text("mine\n")
    for link in (folder / "logs" / "worker-0.log", folder / "trials" / "trial-0" / "trainer_log.jsonl"):
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(victim)
        with pytest.raises(SpartaError, match=f"holds `{link.relative_to(folder)}` as a link"):
            tune(path, flags={"trials": 2})
        link.unlink()
    assert victim.read_text() == "mine\n"


def test_a_key_removed_from_the_recipe_changes_the_study():
    """Only the new recipe's keys were compared: a study resumed with adapter.density deleted trained its
    next trials at the default density, in one study with the earlier ones."""
    ours = {"recipe": {"model": {"name_or_path": "m"}, "task": {"name": "sst2"}, "adapter": {"method": "sparta"}},
            "space": {}, "metric": "loss", "direction": "minimize"}
    stored = json.loads(json.dumps(ours))
    stored["recipe"]["adapter"]["density"] = 0.05
    assert identity_differences(ours, stored) == ["recipe.adapter.density"]
    assert identity_differences(stored, ours) == ["recipe.adapter.density"]
