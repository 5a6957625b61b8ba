"""GraphAF on bad input, as a new user meets it: every refusal names the file or key; nothing silently scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apps.graphaf.chem import PAPER_VALENCE, smiles_to_graph
from apps.graphaf.data import MoleculeDataModule, preprocess, read_smiles
from core.cli import compose


def _evaluate(tmp_path, *args):
    from apps.graphaf.commands import evaluate

    return evaluate(compose("graphaf", "evaluate", [*args, f"output_dir={tmp_path / 'e'}"]))


def test_empty_generated_file_or_reference_is_refused_with_its_name(tmp_path):
    gen, ref, empty = tmp_path / "gen.smi", tmp_path / "ref.smi", tmp_path / "empty.smi"
    gen.write_text("CCO\n")
    ref.write_text("CCO\nCCN\n")
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.smi: no SMILES to evaluate"):
        _evaluate(tmp_path, f"smiles={empty}", f"reference={ref}")
    with pytest.raises(ValueError, match="empty.smi: no molecule RDKit can parse"):
        _evaluate(tmp_path, f"smiles={gen}", f"reference={empty}")


def test_blank_lines_are_not_molecules_and_the_column_hint_names_evaluates_key(tmp_path):
    gen, ref = tmp_path / "gen.smi", tmp_path / "ref.csv"
    gen.write_text("CCO\n\nCCN\n\n")
    ref.write_text("smiles\nCCO\n")
    m = _evaluate(tmp_path, f"smiles={gen}", f"reference={ref}")
    assert m["n"] == 2 and m["validity"] == 1.0 and m["novelty"] == 0.5
    gen_csv = tmp_path / "gen.csv"
    gen_csv.write_text("SMILES\nCCO\n")
    with pytest.raises(ValueError, match="set smiles_column=<name>"):
        _evaluate(tmp_path, f"smiles={gen_csv}", f"reference={ref}")


def test_binary_file_is_named(tmp_path):
    bad = tmp_path / "weights.smi"
    bad.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="weights.smi: not a text file of SMILES"):
        read_smiles(bad)


def test_truncated_cache_is_rebuilt(tmp_path):
    path = tmp_path / "mols.smi"
    path.write_text("CCO\nCCN\nC=O\n")
    cache = tmp_path / "cache"
    a = preprocess(path, atoms=["C", "N", "O"], max_atoms=9, cache_dir=cache, progress=False)
    (f,) = cache.glob("*.npz")
    f.write_bytes(f.read_bytes()[:100])  # truncated: a BadZipFile before the fix
    b = preprocess(path, atoms=["C", "N", "O"], max_atoms=9, cache_dir=cache, progress=False)
    assert b.smiles == a.smiles
    assert preprocess(path, atoms=["C", "N", "O"], max_atoms=9, cache_dir=cache, progress=False).smiles == a.smiles


def test_auto_max_atoms_is_capped_and_a_giant_molecule_is_skipped(tmp_path):
    path = tmp_path / "mols.smi"
    path.write_text("CCO\nCCN\n" + "C" * 3000 + "\n")
    d = preprocess(path, atoms=["C", "N", "O"], max_atoms="auto", max_atoms_cap=50, cache_dir=False, progress=False)
    assert d.max_atoms == 3 and len(d) == 2 and d.skipped == {"too_large": 1}
    # the data module refuses settings whose teacher-forcing batch cannot fit, before any allocation
    dm = MoleculeDataModule(str(path), atoms=["C"], max_atoms="auto", cache_dir=str(tmp_path / "c"), batch_size=64,
                            max_atoms_cap=3000, max_batch_memory_gb=8.0)  # fmt: skip
    with pytest.raises(MemoryError, match=r"needs at least \d+\.\d GB .*data.max_atoms"):
        dm.setup("fit")


def test_auto_settings_build_one_cache_file_that_the_resolved_config_finds(tmp_path):
    path = tmp_path / "mols.smi"
    path.write_text("CCO\nCCN\nC=O\nCC#N\n")
    cache = tmp_path / "cache"
    a = preprocess(path, atoms="auto", max_atoms="auto", cache_dir=cache, progress=False)
    # the resolved values, as a checkpoint's config records them, find the same file: no second preprocessing
    b = preprocess(path, atoms=a.atoms, max_atoms=a.max_atoms, cache_dir=cache, progress=False)
    c = preprocess(path, atoms="auto", max_atoms="auto", cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.npz"))) == 1
    assert a.smiles == b.smiles == c.smiles and a.atoms == b.atoms == ["C", "N", "O"]


def test_drop_charges_keys_atoms_by_element_as_dig():
    from apps.graphaf.chem import AtomVocab

    vocab = AtomVocab.from_tokens(["C", "N", "O"], None)
    g = smiles_to_graph("C[N+](C)(C)C", vocab, 9, drop_charges=True)  # N+ becomes an N with four bonds
    assert list(g.types) == [0, 1, 0, 0, 0] and len(g.bonds) == 4
    with pytest.raises(Exception, match="not in"):
        smiles_to_graph("C[N+](C)(C)C", vocab, 9)
    assert PAPER_VALENCE["N"] == 3


def test_evaluate_names_a_moved_training_file_and_takes_data_path(tmp_path):
    """A checkpoint whose training file moved: the error names the file and the key; data_path= fixes it."""
    from apps.graphaf.commands import train
    from apps.graphaf.data import DEFAULT_DATA
    from tests.apps.graphaf.test_graphaf_cli import TINY
    from tests.helpers import small_config

    src = tmp_path / "train.csv"
    src.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:101]))
    run = tmp_path / "run"
    cfg = small_config(
        "graphaf", run, *TINY, f"data.path={src}", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=32",
        "trainer.max_steps=2", "module.sample_every_n_epochs=0", "samples_after_fit=0", "callbacks.checkpoint=null",
    )  # fmt: skip
    train(cfg)
    moved = tmp_path / "moved.csv"
    src.rename(moved)
    args = [f"ckpt={run}", "n=8", "batch_size=8", "reconstruct_n=4", "reference_n=8"]
    with pytest.raises(FileNotFoundError, match=r"train.csv, which does not exist; give data_path="):
        _evaluate(tmp_path, *args)
    m = _evaluate(tmp_path, *args, f"data_path={moved}")
    assert m["n"] == 8 and "moved.csv" in m["novelty_reference"]
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["reconstruction_n"] == 4
    assert np.isfinite(m["validity_without_check"])
