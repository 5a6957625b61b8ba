"""GraphAF end to end: train -> sample -> evaluate through the CLI, NLL goes down, 2-process CPU DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rdkit import Chem

from apps.graphaf.commands import train
from apps.graphaf.data import DEFAULT_DATA
from core.training import build_module, restore
from tests.helpers import run_cli, small_config

TINY = ["model.hidden=16", "model.rgcn_layers=2", "model.flow_layers=2", "model.st_hidden=[16]"]


@pytest.fixture(scope="module")
def qm9_small(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qm9") / "qm9_small.csv"
    path.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:301]))
    return path


def data_overrides(path: Path) -> list[str]:
    return [
        f"data.path={path}",
        f"data.cache_dir={path.parent / 'cache'}",
        "data.batch_size=32",
        "data.val_fraction=0.1",
    ]


@pytest.fixture(scope="module")
def trained(qm9_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graphaf_run")
    cfg = small_config(
        "graphaf", out, *TINY, *data_overrides(qm9_small), "trainer.max_epochs=2", "trainer.max_steps=-1",
        "trainer.val_check_interval=1.0", "trainer.check_val_every_n_epoch=1", "module.num_samples=8",
        "samples_after_fit=16",
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["global_step"] == 18  # 270 training molecules / 32 per batch = 9 batches, 2 epochs
    assert torch.isfinite(torch.tensor(metrics["val/nll"])) and metrics["samples/validity"] == 1.0
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "samples.smi").is_file()
    assert list((out / "media").glob("molecules_epoch*.png"))
    return out


def test_training_lowers_the_nll(qm9_small, tmp_path):
    from apps.graphaf.commands import resolve_data

    cfg = small_config(
        "graphaf", tmp_path, *TINY, *data_overrides(qm9_small), "trainer.max_epochs=4", "trainer.max_steps=-1",
        "module.sample_every_n_epochs=0", "samples_after_fit=0", "callbacks.checkpoint=null",
        "callbacks.step_checkpoint=null", "trainer.val_check_interval=1.0", "trainer.check_val_every_n_epoch=1",
    )  # fmt: skip
    dm = resolve_data(cfg)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    before = build_module(cfg).eval()
    with torch.no_grad():
        nll_before = before.loss_terms(batch, before.model)["nll"].item()
    from core.training import fit

    result = fit(cfg)
    module = result.module.eval()
    with torch.no_grad():
        nll_after = module.loss_terms(batch, module.eval_model)["nll"].item()
    # 36 steps of a tiny model on 270 QM9 molecules: measured 148.5 -> 54.6 nats per molecule
    assert nll_after < 0.8 * nll_before, f"NLL per molecule {nll_before:.1f} -> {nll_after:.1f}"


def test_checkpoint_records_the_resolved_vocabulary(trained):
    restored = restore(trained)
    module, cfg = restored.module, restored.cfg
    assert list(cfg.data.atoms) == ["C", "N", "O", "F"] and cfg.data.max_atoms == 9
    assert module.model.vocab.tokens == ("C", "N", "O", "F")


def test_sample_command(trained, tmp_path):
    proc = run_cli("graphaf", "sample", f"ckpt={trained}", "n=40", "batch_size=16", "logger=none",
                   f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "samples.smi").read_text().splitlines()
    assert len(lines) == 40 and all(Chem.MolFromSmiles(s) is not None for s in lines)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["validity"] == 1.0 and m["molecules_per_s"] > 0
    assert (tmp_path / "samples.png").stat().st_size > 1000


def test_evaluate_checkpoint(trained, tmp_path):
    proc = run_cli("graphaf", "evaluate", f"ckpt={trained}", "n=40", "batch_size=20", "reconstruct_n=30",
                   "reference_n=60", f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["validity_with_check"] == 1.0 and 0.0 <= m["validity_without_check"] <= 1.0
    assert m["reconstruction"] == 1.0 and m["reconstruction_n"] == 30
    for k in ("uniqueness", "novelty", "qed_mean", "plogp_w1", "sa_ref_mean", "molecules_per_s"):
        assert k in m and m[k] == m[k], k
    assert "reconstruction" in proc.stdout


def test_evaluate_any_smiles_file(tmp_path):
    from apps.graphaf.commands import evaluate
    from core.cli import compose

    gen, ref = tmp_path / "gen.smi", tmp_path / "ref.csv"
    gen.write_text("CCO\nOCC\nc1ccccc1\nC(C)(C)(C)(C)C\nN\n")
    ref.write_text("id,SMILES\n1,CCO\n2,N\n3,CCC\n")
    common = [f"smiles={gen}", f"reference={ref}", f"output_dir={tmp_path / 'e'}"]
    evaluate(compose("graphaf", "evaluate", [*common, "reference_column=SMILES"]))
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert (m["n"], m["validity"], m["uniqueness"], m["novelty"]) == (5, 0.8, 0.75, 0.25)
    with pytest.raises(ValueError, match="ref.csv:1: no column 'smiles'"):  # a wrong column is named with the file
        evaluate(compose("graphaf", "evaluate", common))


def test_help_lists_the_commands(capsys):
    from apps.graphaf.commands import COMMANDS, DESCRIPTIONS
    from core.cli import main

    main("graphaf", COMMANDS, DESCRIPTIONS, argv=["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "sample", "evaluate"):
        assert f"  {cmd}" in out
    assert "zinc250k" in out and "paper" in out


def test_ddp_two_cpu_processes(qm9_small, tmp_path):
    proc = run_cli(
        "graphaf", "train", "trainer=ddp_cpu", "trainer.max_epochs=1", "trainer.max_steps=-1", "logger=csv",
        "trainer.val_check_interval=5", "trainer.check_val_every_n_epoch=1", *TINY, *data_overrides(qm9_small),
        "module.num_samples=4",
        "samples_after_fit=4", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["global_step"] == 5  # 270 molecules / (32 per batch x 2 ranks), rounded up
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_a_short_runs_preview_samples_never_fail_the_finished_training(qm9_small, tmp_path, monkeypatch):
    """The samples after training are a preview: when the model makes almost only molecules under min_atoms (a
    short run), they keep every size, and when RDKit's drawing cannot load (no libXrender) there is no PNG, instead
    of failing a training that has finished and saved its checkpoint."""
    import sys

    import rdkit.Chem

    import apps.graphaf.commands as commands

    monkeypatch.delattr(rdkit.Chem, "Draw", raising=False)
    monkeypatch.setitem(sys.modules, "rdkit.Chem.Draw", None)  # as on a machine without libXrender.so.1

    real = commands.generate_smiles
    asked: list[int] = []

    def picky(model, n, batch_size, temperature, valency_check, desc, min_atoms=1):
        asked.append(min_atoms)
        if min_atoms > 1:
            raise commands.MinAtomsError(f"min_atoms={min_atoms}: 25600 molecules rejected for size against 0 kept")
        return real(model, n, batch_size, temperature, valency_check, desc, min_atoms)

    monkeypatch.setattr(commands, "generate_smiles", picky)
    cfg = small_config(
        "graphaf", tmp_path, *TINY, *data_overrides(qm9_small), "trainer.max_steps=2", "module.sample_every_n_epochs=0",
        "samples_after_fit=4", "min_atoms=7", "callbacks.step_checkpoint=null",
    )  # fmt: skip
    metrics = train(cfg)
    assert asked == [7, 1] and metrics["samples/min_atoms"] == 1
    assert len((tmp_path / "samples.smi").read_text().split()) == 4 and not (tmp_path / "samples.png").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["samples/min_atoms"] == 1
