"""A run is never silently corrupted or lost: checkpoints, resume, run directories, config values, DDP evaluation.

Each test covers one numbered item of the core issue (#10) and fails on the stack as it was before it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from core.cli import check_invocation
from core.config_checks import ConfigValueError
from core.rundir import RunDirError, claim_run_dir
from core.training import CheckpointError, fit, read_checkpoint, resolve_checkpoint, restore
from core.training.checkpoint import NonFiniteCheckpointError, checkpoint_step, write_checkpoint
from tests.helpers import run_cli, small_config

SHRINK = ["data.n_train=2048", "data.n_val=512", "data.n_test=512", "module.sample_every_n_epochs=0"]


class InterruptFresh(pl.Callback):
    """Presses Ctrl-C before the given optimizer step of a fresh (not resumed) run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.ckpt_path is None:
            raise KeyboardInterrupt


INTERRUPT = [
    "+callbacks.interrupt._target_=tests.training.test_run_safety.InterruptFresh",
    "+callbacks.interrupt.step=3",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished density2d run of 2 epochs (4 steps each): its run directory."""
    out = tmp_path_factory.mktemp("trained")
    fit(small_config("density2d", out, "trainer.max_epochs=2", *SHRINK))
    return out


def _copy_with(src: Path, dst: Path, **changes) -> Path:
    ckpt = torch.load(src, weights_only=True)
    for key, value in changes.items():
        if key == "app":
            ckpt["flowsuite"]["app"] = value
        else:
            ckpt[key] = value
    torch.save(ckpt, dst)
    return dst


# ---- 7. a failed resume never destroys the newest checkpoint ---------------------------------------------------
def test_a_failed_resume_keeps_the_interrupted_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        fit(small_config("density2d", run, "trainer.max_epochs=2", *SHRINK, *INTERRUPT))
    interrupted = run / "checkpoints" / "interrupted.ckpt"
    before = interrupted.read_bytes()
    assert checkpoint_step(interrupted) == 3
    # resume into the same run dir with a model that does not fit the weights: fails at start-up, no step runs
    with pytest.raises(Exception):  # noqa: B017 (Lightning wraps the load error)
        fit(small_config("density2d", run, "trainer.max_epochs=2", f"ckpt_path={run}", "model.hidden=[7]", *SHRINK))
    assert interrupted.read_bytes() == before, "a failed resume replaced the newest checkpoint"


def test_no_checkpoint_replaces_one_of_a_later_step(tmp_path):
    path = tmp_path / "a.ckpt"
    assert write_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1457}, path)
    assert not write_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 0}, path)
    kept = torch.load(path, weights_only=True)
    assert kept["global_step"] == 1457 and torch.equal(kept["state_dict"]["w"], torch.ones(2))
    assert write_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 1458}, path)


def test_no_checkpoint_holds_a_non_finite_tensor(tmp_path):
    path = tmp_path / "a.ckpt"
    with pytest.raises(NonFiniteCheckpointError, match="state_dict.w"):
        write_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}, "global_step": 3}, path)
    assert not path.exists()


# ---- 8. a run directory resumes from its newest checkpoint ------------------------------------------------------
def test_run_dir_resolves_to_the_checkpoint_of_the_highest_step(trained, tmp_path):
    last = trained / "checkpoints" / "last.ckpt"
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    _copy_with(last, run / "last.ckpt", global_step=1000)
    _copy_with(last, run / "interrupted.ckpt", global_step=1457)
    _copy_with(last, run / "epoch000-step0000500.ckpt", global_step=500)
    assert resolve_checkpoint(tmp_path / "run") == run / "interrupted.ckpt"
    (run / "interrupted.ckpt").write_bytes(b"")  # a broken file is skipped, not chosen
    assert resolve_checkpoint(tmp_path / "run") == run / "last.ckpt"


# ---- 9 (and 7, 8 end to end). Ctrl-C says where the checkpoint is and how to resume --------------------------
def test_ctrl_c_prints_the_checkpoint_and_a_resume_command_that_works(tmp_path):
    run = tmp_path / "a"
    args = ["trainer.max_epochs=2", "logger=none", "trainer.enable_progress_bar=false", *SHRINK, *INTERRUPT]
    proc = run_cli("density2d", "train", *args, f"hydra.run.dir={run}")
    assert proc.returncode != 0
    ckpt = run / "checkpoints" / "interrupted.ckpt"
    assert f"Checkpoint: {ckpt}" in proc.stderr, proc.stderr[-2000:]
    command = proc.stderr.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "apps.density2d", "train"] and argv[-1] == f"ckpt_path={ckpt}"
    assert not any(a.startswith("hydra.run.dir=") for a in argv), "the resumed run gets a run dir of its own"
    resumed = run_cli("density2d", *argv[3:], f"hydra.run.dir={tmp_path / 'b'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["global_step"] == 8


# ---- 10. commands never overwrite another run's outputs ---------------------------------------------------------
def test_evaluate_refuses_a_training_run_dir(trained):
    metrics = (trained / "metrics.json").read_bytes()
    proc = run_cli("density2d", "evaluate", f"ckpt={trained}", f"hydra.run.dir={trained}")
    assert proc.returncode != 0 and "already holds the outputs" in proc.stderr
    assert (trained / "metrics.json").read_bytes() == metrics
    assert not (trained / ".hydra").exists(), "Hydra wrote its config into the other run's directory"
    proc = run_cli("density2d", "evaluate", f"ckpt={trained}", f"output_dir={trained}")
    assert proc.returncode != 0 and "already holds the outputs" in proc.stderr
    assert (trained / "metrics.json").read_bytes() == metrics


def test_a_second_command_into_the_same_dir_is_refused_or_replaces_its_own_outputs(tmp_path):
    claim_run_dir(tmp_path, "pointflow", "sample")
    for i in range(5):
        (tmp_path / f"sample_{i}.ply").write_text("old")
    with pytest.raises(RunDirError, match="overwrite=true"):
        claim_run_dir(tmp_path, "pointflow", "sample")
    with pytest.raises(RunDirError):
        claim_run_dir(tmp_path, "pointflow", "evaluate", overwrite=True)  # never clears another command's run
    claim_run_dir(tmp_path, "pointflow", "sample", overwrite=True)
    assert not list(tmp_path.glob("*.ply")), "the earlier run's outputs were left beside the new ones"


def test_overwrite_never_clears_the_checkpoint_a_command_reads(tmp_path):
    """``train ckpt_path=<dir> hydra.run.dir=<dir> overwrite=true`` once deleted the checkpoint it resumed from."""
    claim_run_dir(tmp_path, "density2d", "train")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    for reads in ([str(tmp_path)], [str(ckpt)]):
        with pytest.raises(RunDirError, match="reads"):
            claim_run_dir(tmp_path, "density2d", "train", overwrite=True, reads=reads)
    assert ckpt.read_bytes() == b"weights"
    claim_run_dir(tmp_path, "density2d", "train", overwrite=True, reads=[str(tmp_path.parent / "elsewhere.ckpt")])
    assert not ckpt.exists()


def test_sample_with_overwrite_leaves_no_stale_outputs(trained, tmp_path):
    out = tmp_path / "s"
    assert run_cli("density2d", "sample", f"ckpt={trained}", "n=300", f"hydra.run.dir={out}").returncode == 0
    again = run_cli("density2d", "sample", f"ckpt={trained}", "n=100", f"hydra.run.dir={out}")
    assert again.returncode != 0 and "overwrite=true" in again.stderr
    again = run_cli("density2d", "sample", f"ckpt={trained}", "n=100", f"hydra.run.dir={out}", "overwrite=true")
    assert again.returncode == 0, again.stderr[-2000:]
    assert np.load(out / "samples.npy").shape == (100, 2)


# ---- 11. checkpoints say who wrote them; bad files get errors naming them ---------------------------------------
def test_checkpoint_records_app_command_and_format(trained):
    meta = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)["flowsuite"]
    assert meta == {"format": 1, "app": "density2d", "command": "train"}


def test_another_apps_checkpoint_is_refused_by_name(trained, tmp_path):
    foreign = _copy_with(trained / "checkpoints" / "last.ckpt", tmp_path / "pf.ckpt", app="pointflow")
    with pytest.raises(CheckpointError, match="was written by apps.pointflow, not apps.density2d"):
        restore(foreign, app="density2d")
    proc = run_cli("density2d", "sample", f"ckpt={foreign}", f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode != 0 and "was written by apps.pointflow, not apps.density2d" in proc.stderr


class Payload:
    """Unpickling this would run code: ``weights_only`` loading must refuse it."""

    ran = False

    def __reduce__(self):
        return (Payload._run, ())

    @staticmethod
    def _run():
        Payload.ran = True
        return "ran"


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "list", "foreign_dict", "code"])
def test_bad_checkpoint_files_name_the_file(trained, tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    good = (trained / "checkpoints" / "last.ckpt").read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "text":
        path.write_text("model: realnvp\n")
    elif kind == "list":
        torch.save([torch.ones(1)], path)
    elif kind == "foreign_dict":
        torch.save({"model": torch.ones(1)}, path)
    else:
        torch.save({"state_dict": {}, "flowsuite_config": {}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        read_checkpoint(path)
    assert not Payload.ran, "loading a checkpoint ran code"


def test_restore_gives_module_config_and_datamodule(trained):
    restored = restore(trained, {"data": {"n_test": 64}}, app="density2d")
    module, cfg, dm = restored
    assert (
        not module.training
        and restored.global_step == 8
        and restored.path.name in {"last.ckpt"} | {p.name for p in (trained / "checkpoints").glob("*.ckpt")}
    )
    assert cfg.data.n_test == 64 and cfg.model == restored.cfg.model
    dm.setup()
    assert len(dm.splits["test"]) == 64


# ---- 12. wrong config values stop before anything runs ----------------------------------------------------------
@pytest.mark.parametrize(
    "command, override, key",
    [
        ("train", "trainer.max_steps=abc", "trainer.max_steps"),
        ("train", "data.batch_size=0", "data.batch_size"),
        ("train", "trainer.max_epochs=-3", "trainer.max_epochs"),
        ("train", "module.optimizer.lr=fast", "module.optimizer.lr"),
        ("sample", "n=abc", "n"),
        ("sample", "n=-5", "n"),
        ("sample", "temperature=hot", "temperature"),
        ("sample", "temperature=-1", "temperature"),
    ],
)
def test_wrong_values_are_refused_with_the_key(command, override, key):
    extra = ["ckpt=x.ckpt"] if command == "sample" else []
    with pytest.raises(ConfigValueError, match=f"'{key}' expects"):
        check_invocation("density2d", command, [*extra, override])


def test_right_values_pass_the_checks():
    check_invocation("density2d", "train", ["trainer.max_steps=10", "module.optimizer.lr=1", "model=maf"])
    check_invocation("density2d", "sample", ["ckpt=x.ckpt", "n=5", "temperature=1"])
    check_invocation("density2d", "sample", ["ckpt=x.ckpt", "temperature=0"])  # 0 draws the mode


def test_a_wrong_value_stops_the_cli_before_a_run_dir_exists(tmp_path):
    proc = run_cli("density2d", "train", "trainer.max_steps=abc", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "config key 'trainer.max_steps' expects an integer" in proc.stderr
    assert not (tmp_path / "run").exists()


# ---- 5. DDP evaluation counts every sample once ------------------------------------------------------------------
def test_ddp_test_nll_equals_the_single_process_value(trained, tmp_path):
    """1,001 test points on 2 ranks in batches of 500: rank 1's last batch is pure padding."""
    common = [
        f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
        "trainer.max_epochs=2",
        *SHRINK,
        "data.n_test=1001",
        "data.batch_size=500",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "callbacks.checkpoint=null",
        "callbacks.step_checkpoint=null",
    ]
    values = {}
    for trainer in ("cpu", "ddp_cpu"):
        proc = run_cli("density2d", "train", f"trainer={trainer}", *common, f"hydra.run.dir={tmp_path / trainer}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        values[trainer] = json.loads((tmp_path / trainer / "metrics.json").read_text())["test/nll"]
    assert values["ddp_cpu"] == pytest.approx(values["cpu"], rel=1e-6, abs=1e-6)


def test_a_resumed_run_never_writes_into_the_run_it_resumes(tmp_path):
    """``train ckpt_path=<dir> output_dir=<dir>`` once continued in place, and Lightning's CSV logger then rewrote
    the earlier run's metrics.csv from the resumed step on (tried): it is refused, naming where to write."""
    claim_run_dir(tmp_path, "density2d", "train")
    ckpt = tmp_path / "checkpoints" / "interrupted.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step\n1\n")
    for resumes in (str(ckpt), str(tmp_path)):
        with pytest.raises(RunDirError, match="resumed run writes to a new directory"):
            claim_run_dir(tmp_path, "density2d", "train", reads=[resumes], resumes=resumes)
    with pytest.raises(RunDirError, match="already holds"):
        claim_run_dir(tmp_path, "density2d", "train", reads=[str(ckpt)])  # a fresh run: refused as before
    assert ckpt.read_bytes() == b"weights" and (tmp_path / "csv" / "metrics.csv").read_text() == "step\n1\n"
    claim_run_dir(tmp_path / "new", "density2d", "train", reads=[str(ckpt)], resumes=str(ckpt))  # elsewhere: fine


def test_save_checkpoint_with_a_restored_runs_config_reads_back(tmp_path):
    """``save_checkpoint(module, path, step, restored.cfg)`` pickled omegaconf objects into the file, which
    ``weights_only`` loading then refused (tried, exporting a trained model); the config is stored as plain values."""
    from omegaconf import OmegaConf

    from core.training import save_checkpoint
    from core.training.checkpoint import CONFIG_KEY

    cfg = OmegaConf.create({"app": "density2d", "command": "train", "model": {"hidden": [8, 8]}, "seed": 0})
    path = tmp_path / "model.ckpt"
    assert save_checkpoint(torch.nn.Linear(2, 2), path, 7, cfg)
    ckpt = read_checkpoint(path, app="density2d")
    assert ckpt["global_step"] == 7
    assert OmegaConf.create(ckpt[CONFIG_KEY]).model.hidden == [8, 8]
