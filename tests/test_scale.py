"""Scaling out: DDP on CPU processes matches one process; sweeps and launchers compose from config."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tests.conftest import SMALL_IMAGES, make_imagefolder, run_cli

# dropout 0 and fp32: DDP's averaged gradients over 2 x 4 samples equal one process's over the same 8
PARITY = [*SMALL_IMAGES, "experiment=lite0_fe", "trainer.max_epochs=3", "model.head.dropout=0", "trainer.precision=32"]


@pytest.mark.slow
def test_ddp_cpu_matches_one_process_writes_one_set_of_outputs_and_resumes_after_sigterm(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_split={"train": 16, "val": 6}, size=(96, 72))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    one = run_cli(*PARITY, f"data.root={data}", "data.batch_size=8", f"hydra.run.dir={single}", scratch=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]

    # two ranks of 4 images a step: SIGTERM to rank zero mid-epoch (as a scheduler sends it; Lightning forwards
    # it to rank 1): last.ckpt from rank zero, status 143, no process left behind; then the resume
    ddp_args = [*PARITY, f"data.root={data}", "trainer=ddp_cpu", "data.batch_size=4", f"hydra.run.dir={ddp}"]
    signal_at = ["+callbacks.signal_at._target_=tests.signals.SignalAt", "+callbacks.signal_at.epoch=1"]
    fresh = tmp_path / "fresh"  # its own feature cache: built by rank zero of the first launch
    stopped = run_cli(*ddp_args, *signal_at, "+callbacks.signal_at.batch=1", scratch=fresh)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "SIGTERM: saved" in stopped.stdout + stopped.stderr
    assert not (ddp / "summary.json").exists()
    resumed = run_cli(*ddp_args, "ckpt_path=last", scratch=fresh)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # the interrupted and resumed two-process run ends where one process does (stated tolerance: equal
    # accuracy, losses within 1e-5; train/loss of the interrupted epoch counts the resumed steps only)
    a = json.loads((single / "summary.json").read_text())["history"]
    b = json.loads((ddp / "summary.json").read_text())["history"]
    assert len(a) == len(b) == 3
    for epoch, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x["val/acc"] == y["val/acc"]
        assert abs(x["val/loss"] - y["val/loss"]) <= 1e-5, (x, y)
        assert epoch == 1 or abs(x["train/loss"] - y["train/loss"]) <= 1e-5, (x, y)
    wa = torch.load(single / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys()
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) <= 1e-5

    # one set of outputs, from rank zero
    assert [p.relative_to(ddp) for p in ddp.rglob("summary.json")] == [Path("summary.json")]
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["epoch_002.ckpt", "last.ckpt"]
    assert len(list((ddp / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per launch
    assert sorted(p.name for p in ddp.glob("*.csv")) == ["duplicates.csv", "skipped_files.csv", "split.csv"]
    log = (ddp / "train.log").read_text()
    # built once by rank zero, read by rank 1 (whose log lines land in the same train.log); both ranks of the
    # resumed launch read it
    assert log.count("Embedded val") == 1 and log.count("Embedded train view 0") == 1
    assert log.count("Feature cache hit") == 6  # val and train: rank 1 of the first launch, both of the second
    assert log.count("CONFIG") == 2  # once per launch: rank zero only


# --------------------------------------------------------------------------------------- composition

CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_train(*overrides: str) -> DictConfig:
    from hydra import compose, initialize_config_dir

    import src.train  # noqa: F401  (registers the config's fastest_precision resolver)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_every_trainer_option_composes_and_instantiates_where_it_can(tmp_path):
    names = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))
    assert names == ["ddp", "ddp_cpu", "default"]
    for name in names:
        cfg = compose_train(f"trainer={name}", f"paths.output_dir={tmp_path}")
        t = cfg.trainer
        assert t.max_epochs == 10 and t.plugins[0]._target_.endswith("AtomicCheckpointIO")
        if name == "default":
            assert t.devices == "auto" and "strategy" not in t
            continue
        assert t.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy"
        assert t.use_distributed_sampler is False  # the datamodule shards the seeded order itself
        assert (t.accelerator, t.strategy.process_group_backend) == (
            ("cpu", "gloo") if name == "ddp_cpu" else ("gpu", "nccl")
        )
    trainer = instantiate(compose_train("trainer=ddp_cpu", f"paths.output_dir={tmp_path}").trainer, logger=False)
    assert trainer.world_size == 2 and type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.strategy.process_group_backend == "gloo"


def test_every_hparams_search_option_composes_as_a_multirun():
    names = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))
    assert names == ["lr_dropout_grid", "lr_dropout_optuna"]
    grid = compose_train("hparams_search=lr_dropout_grid")
    assert grid.hydra.mode == RunMode.MULTIRUN and grid.optimized_metric == "best_val_loss"
    assert grid.hydra.sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    assert dict(grid.hydra.sweeper.params) == {
        "model.optimizer.lr": "0.001,0.003,0.01,0.03",
        "model.head.dropout": "0.2,0.4",
    }
    optuna = compose_train("hparams_search=lr_dropout_optuna")
    sweeper = optuna.hydra.sweeper
    assert optuna.hydra.mode == RunMode.MULTIRUN and sweeper.direction == "minimize"
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 42
    assert dict(sweeper.params) == {
        "model.optimizer.lr": "tag(log, interval(0.0001, 0.1))",
        "model.head.dropout": "interval(0.0, 0.6)",
    }


def test_pinned_optuna_stack_installs_and_keeps_a_study_in_sqlite(tmp_path):
    """The sweeper plugin needs optuna<3; optuna 2.10's RDB storage breaks on SQLAlchemy 2 (the known clash)."""
    from importlib.metadata import version

    import optuna

    assert version("hydra-optuna-sweeper") == "1.3.0" and optuna.__version__ == "2.10.1"
    assert version("sqlalchemy").startswith("1.4.")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url, sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("lr", 1e-4, 1e-1, log=True) - 0.01) ** 2, n_trials=3)
    again = optuna.load_study(study_name="s", storage=url)
    assert len(again.trials) == 3 and again.best_value == study.best_value


@pytest.mark.parametrize("launcher", ["submitit_slurm", "slurm"])
def test_slurm_launchers_compose_into_the_sbatch_script_they_would_submit(launcher, tmp_path, monkeypatch):
    """No SLURM here: run the plugin's own launch() up to submission and read the sbatch text it made."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    overrides = [f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path}", "hydra.job.name=train"]
    if launcher == "slurm":  # 2 nodes x 4 GPUs, one task per GPU, as conf/hydra/launcher/slurm.yaml says
        overrides += ["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.nodes=2"]
        overrides += [
            "hydra.launcher.tasks_per_node=4",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.partition=gpu",
        ]
    cfg = compose_train(*overrides)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_") == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    scripts = []

    def capture(executor, fn, *args):
        scripts.append(executor._executor._make_submission_file_text("python -m src.train", "uid"))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # "srun is there"
    launcher_obj = SlurmLauncher(**params)
    launcher_obj.setup(config=cfg, hydra_context=None, task_function=lambda c: None)
    assert launcher_obj.launch([["model.optimizer.lr=0.01"]], initial_job_idx=0) == []
    sbatch = scripts[0]
    if launcher == "slurm":
        expected = ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=64GB"]
        expected += ["--time=720", "--partition=gpu", "--signal=USR2@120", "--job-name=train"]
    else:
        expected = ["--nodes=1", "--ntasks-per-node=1", "--time=60", "--signal=USR2@120"]
    for line in expected:
        assert f"#SBATCH {line}\n" in sbatch, (line, sbatch)
    assert str(tmp_path / ".submitit") in sbatch


def optuna_sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path, list[dict[str, str]]]:
    """hparams_search=lr_dropout_optuna on a tiny dataset: (the process, the sweep dir, sweep_summary.csv rows)."""
    data = make_imagefolder(tmp_path / "data", per_split={"train": 8, "val": 4})
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "experiment=lite0_fe",
        f"data.root={data}",
        "hparams_search=lr_dropout_optuna",
        *overrides,
        f"hydra.sweep.dir={sweep}",
        scratch=tmp_path,
    )
    if not (sweep / "sweep_summary.csv").is_file():
        return proc, sweep, []
    with open(sweep / "sweep_summary.csv") as f:
        return proc, sweep, list(csv.DictReader(f))


@pytest.mark.slow
def test_three_trial_optuna_sweep_returns_its_best_value_and_fills_the_hparams_view(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    proc, sweep, rows = optuna_sweep(tmp_path, "hydra.sweeper.n_trials=3", "trainer.max_epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == pytest.approx(min(float(r["best_val_loss"]) for r in rows))
    assert f"Best value: {results.best_value}" in proc.stdout + proc.stderr

    caches = [json.loads((sweep / str(j) / "summary.json").read_text())["feature_cache"] for j in range(3)]
    assert caches[0]["misses"] == 2 and all(c["misses"] == 0 and c["hits"] == 2 for c in caches[1:])  # shared

    for j in range(3):  # TensorBoard's HParams tab: each job's lr and dropout beside its best metrics
        events = EventAccumulator(str(sweep / str(j) / "tensorboard"))
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        summary = json.loads((sweep / str(j) / "summary.json").read_text())
        overrides = OmegaConf.load(sweep / str(j) / ".hydra" / "overrides.yaml")
        lr = next(float(o.split("=")[1]) for o in overrides if o.startswith("model.optimizer.lr="))
        assert hparams["model.optimizer.lr"].number_value == pytest.approx(lr)
        assert 0.0 <= hparams["model.head.dropout"].number_value <= 0.6
        best = events.Scalars("hp/best_val_loss")[-1].value
        assert best == pytest.approx(summary["best_val_loss"], rel=1e-6)


@pytest.mark.slow
def test_optuna_search_goes_on_past_failed_trials_and_the_sweep_exits_non_zero(tmp_path):
    proc, _, rows = optuna_sweep(
        tmp_path,
        "hydra.sweeper.n_trials=4",
        "trainer.max_epochs=1",
        "model.head.dropout=interval(0.5, 1.5)",  # dropout >= 1 fails its trial's config check
    )
    out = proc.stdout + proc.stderr
    assert len(rows) == 4 and "Best value:" in out  # all 4 trials ran and Optuna picked the best of the ok ones
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and len(failed) < 4
    assert all("model.head.dropout must be a number in [0, 1)" in r["reason"] for r in failed)
    assert proc.returncode == 1 and f"{len(failed)} of 4 sweep jobs failed" in out


@pytest.mark.slow
def test_a_local_sweep_of_ddp_jobs_is_refused_with_the_way_out(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_split={"train": 4, "val": 2})
    proc = run_cli(
        "-m",
        "experiment=lite0_fe",
        f"data.root={data}",
        "trainer=ddp_cpu",
        f"hydra.sweep.dir={tmp_path / 's'}",
        scratch=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "hydra/launcher=slurm" in out and "trainer.devices=1" in out
    assert not list((tmp_path / "s").rglob("*.ckpt"))  # nothing trained, no process started a second sweep
