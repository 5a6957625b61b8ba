"""VideoFlow end to end: training lowers bits per pixel, train -> predict -> evaluate through the CLI, CPU DDP."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from apps.videoflow.commands import evaluate, predict
from core.cli import compose
from core.training import build_module, fit
from tests.helpers import run_cli, small_config

TINY = [
    "model.steps=1", "model.hidden=8", "model.prior_hidden=8", "model.levels=2", "data.size=16",
    "data.num_train=16", "data.num_val=4", "data.num_test=4", "data.batch_size=4", "data.eval_batch_size=4",
    "data.target_frames=2", "module.num_sample_videos=1", "model.prior_blocks=1", "evaluation.num_samples=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("videoflow_run")
    result = fit(small_config("videoflow", out, *TINY, "trainer.max_epochs=1"))
    assert result.trainer.global_step == 4 and np.isfinite(result.metrics["test/bpd"])
    assert list((out / "media").glob("prediction_epoch*.gif")) and list((out / "media").glob("predictions_*.png"))
    return out


def test_help_lists_the_commands(capsys):
    from apps.videoflow.commands import COMMANDS, DESCRIPTIONS
    from core.cli import main

    main("videoflow", COMMANDS, DESCRIPTIONS, argv=["--help"])
    out = capsys.readouterr().out
    for command in ("train", "predict", "evaluate"):
        assert f"  {command} " in out
    assert "stochastic_movement" in out and "moving_mnist" in out


def test_short_training_lowers_bits_per_pixel(tmp_path):
    cfg = small_config(
        # 5-bit: at 8 bits this 32-clip toy set (black frames, one small shape) drives a 1-step Glow's ActNorm to
        # large scales and 2 of the 4 held-out clips end far outside what it saw (measured: 7.2 -> 19,000 bits)
        "videoflow", tmp_path, *TINY, "model.bits=5", "data.num_train=32", "trainer.max_epochs=6",
        "module.sample_every_n_epochs=0",
        "module.optimizer.lr=3e-3", "module.scheduler=null", "callbacks.checkpoint=null",
        "callbacks.step_checkpoint=null", "test_after_fit=false",
    )  # fmt: skip
    dm = instantiate(cfg.data)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    before_module = build_module(cfg)
    before_module.model.train()
    before_module.model.log_prob(next(iter(dm.train_dataloader())))  # ActNorm's data-dependent start, as training
    torch.manual_seed(1)  # the same dequantisation noise for both evaluations
    with torch.no_grad():
        before = -before_module.model.eval().log_prob(batch).mean() / before_module.num_dims(batch) / np.log(2)
    result = fit(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        after = -result.module.eval_model.eval().log_prob(batch).mean() / result.module.num_dims(batch) / np.log(2)
    # 48 steps of a tiny model: measured 3.58 -> 2.68 bits per pixel on held-out clips (the light prior, 5-bit)
    print(f"bits per pixel {before:.3f} -> {after:.3f}")
    assert after < before - 0.3, f"bits per pixel {before:.3f} -> {after:.3f}"


def test_predict_from_checkpoint_writes_gif_mp4_png(trained, tmp_path):
    proc = run_cli(
        "videoflow", "predict", f"ckpt={trained}", "num_videos=2", "num_samples=2", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = np.load(tmp_path / "predictions.npy")
    assert pred.shape == (2, 2, 2, 3, 16, 16) and pred.dtype == np.uint8
    gif = iio.imread(tmp_path / "test_0000_sample0.gif", index=None)
    assert gif.shape[0] == 3  # 1 context frame + 2 predicted
    assert (tmp_path / "test_0000_sample1.mp4").stat().st_size > 500
    assert iio.imread(tmp_path / "test_0001.png").ndim == 3


def test_predict_from_an_input_file(trained, tmp_path):
    v = np.random.default_rng(0).integers(0, 256, (3, 4, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "clips.npy", v)
    cfg = compose("videoflow", "predict", [f"output_dir={tmp_path / 'p'}", f"ckpt={trained}", "num_samples=1",
                                           f"input={tmp_path / 'clips.npy'}", "steps=3"])  # fmt: skip
    predict(cfg)
    assert np.load(tmp_path / "p" / "predictions.npy").shape == (3, 1, 3, 3, 16, 16)
    assert len(list((tmp_path / "p").glob("clips_*_sample0.gif"))) == 3


def test_evaluate_writes_bits_per_pixel_and_best_of_n(trained, tmp_path, capsys):
    cfg = compose("videoflow", "evaluate", [f"output_dir={tmp_path}", f"ckpt={trained}", "num_samples=3"])
    evaluate(cfg)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n_videos"] == 4 and m["target_frames"] == 2 and m["bits"] == 8 and m["split"] == "test"
    assert m["num_samples"] == 3 and m["temperature"] == 1.0  # the paper's evaluation temperature
    assert (
        0 < m["test_bpd"] < 8 and 0 < m["best_psnr"] < 100
    )  # 8: a uniform 8-bit model (measured 6.8) and -1 <= m["best_ssim"] <= 1
    assert len(m["best_psnr_per_step"]) == 2
    assert "test_bpd" in capsys.readouterr().out
    # without num_samples=, the training run's evaluation.num_samples (2 here; 100 in experiment=paper)
    cfg = compose("videoflow", "evaluate", [f"output_dir={tmp_path / 'e2'}", f"ckpt={trained}", "max_videos=2"])
    assert evaluate(cfg)["num_samples"] == 2
    cfg = compose("videoflow", "evaluate", [f"output_dir={tmp_path / 'e3'}", f"ckpt={trained}", "psnr_ssim=false"])
    assert "best_psnr" not in evaluate(cfg)


def test_ddp_two_cpu_processes(tmp_path):
    proc = run_cli(
        "videoflow", "train", "trainer=ddp_cpu", "trainer.max_epochs=1", "logger=csv", *TINY,
        "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["global_step"] == 2  # 16 clips / (4 per batch x 2 ranks)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and np.isfinite(m["test/bpd"])
