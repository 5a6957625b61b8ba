"""The dispatcher: help, errors that name the key, and the argv that DDP worker ranks receive."""

from __future__ import annotations

import json
import sys

import pytest

from apps.density2d.commands import COMMANDS
from core.cli import dedupe_overrides, main, split_flags
from tests.helpers import run_cli


def test_dedupe_keeps_the_last_value_and_flags():
    args = ["a=1", "hydra.run.dir=x", "-m", "+b=2", 'hydra.run.dir="y"', "a=3"]
    assert dedupe_overrides(args) == ["-m", "+b=2", 'hydra.run.dir="y"', "a=3"]


def test_flags_keep_their_values_and_overrides_stay_together():
    args = ["model=maf", "-m", "a=1,2", "--cfg", "job", "--info", "defaults", "--resolve", "b=3"]
    assert split_flags(args) == (
        ["-m", "--cfg", "job", "--info", "defaults", "--resolve"],
        ["model=maf", "a=1,2", "b=3"],
    )
    assert split_flags(["--info", "x=1"]) == (["--info"], ["x=1"])


def test_multirun_runs_one_job_per_value(tmp_path):
    proc = run_cli(
        "density2d",
        "train",
        "-m",
        "model=realnvp,maf",
        "trainer.fast_dev_run=true",
        "logger=none",
        f"hydra.sweep.dir={tmp_path}",
        "trainer.enable_progress_bar=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["0", "1"]
    assert all((tmp_path / k / "metrics.json").is_file() for k in ("0", "1"))


def test_help_lists_commands_groups_and_keys(capsys):
    main("density2d", COMMANDS, argv=["--help"])
    out = capsys.readouterr().out
    for word in ("train", "sample", "evaluate", "trainer", "ddp_cpu", "realnvp", "cnf", "wandb", "ckpt_path"):
        assert word in out


def test_unknown_command_names_the_choices():
    with pytest.raises(SystemExit, match="unknown command 'fit'.*train, sample, evaluate"):
        main("density2d", COMMANDS, argv=["fit"])


def test_worker_rank_argv_is_accepted(tmp_path, monkeypatch):
    """Lightning re-launches `python -m apps.X <argv[1:]> hydra.run.dir="..." hydra.job.name=...
    hydra.output_subdir=null`: the command is still first and hydra.run.dir may now appear twice."""
    run_dir = tmp_path / "worker"
    argv = [
        "train",
        f"hydra.run.dir={tmp_path / 'user'}",
        "trainer.fast_dev_run=true",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f'hydra.run.dir="{run_dir}"',
        "hydra.job.name=train_ddp_process_1",
        "hydra.output_subdir=null",
    ]
    monkeypatch.setattr(sys, "argv", ["apps/density2d/__main__.py", *argv])
    metrics = main("density2d", COMMANDS)
    assert sys.argv == ["apps/density2d/__main__.py", *argv], "sys.argv must be restored"
    assert metrics["global_step"] == 1
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 1


def test_bad_overrides_name_the_key_and_choices(tmp_path):
    proc = run_cli("density2d", "train", "model=realnpv", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "realnpv" in proc.stderr and "realnvp" in proc.stderr and "maf" in proc.stderr
    proc = run_cli("density2d", "train", "trainer.max_epoch=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "max_epoch" in proc.stderr


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = run_cli("density2d", "train", "model=maf", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "core.presets.maf" in proc.stdout and "lightning.pytorch.Trainer" in proc.stdout


def test_data_overrides_need_no_plus_where_the_command_merges_them_over_a_checkpoint():
    """``evaluate ckpt=... data.root=...`` failed in Hydra ("Could not override 'data.root'") because evaluate's
    config holds ``data: {}``; the CLI now adds the ``+`` itself, and only there."""
    from core.cli import compose, open_mapping_overrides

    args = ["ckpt=x.ckpt", "data.root=/data/pc15k", "+data.split=test", "seed=3"]
    opened = open_mapping_overrides("pointflow", "evaluate", args)
    assert opened == ["ckpt=x.ckpt", "+data.root=/data/pc15k", "+data.split=test", "seed=3"]
    assert compose("pointflow", "evaluate", opened).data.root == "/data/pc15k"
    # train's data group has its keys: overrides stay as written (a misspelt key is still refused there)
    assert open_mapping_overrides("pointflow", "train", ["data.root=/x"]) == ["data.root=/x"]
