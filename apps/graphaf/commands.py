"""GraphAF commands: train, sample, evaluate. Each takes the composed Hydra config."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rdkit import Chem
from tqdm import tqdm

from apps.graphaf.chem import AtomVocab, MolGraph, canonical_smiles, graph_to_mol
from apps.graphaf.data import MoleculeDataModule, graphs_to_batch, read_smiles
from apps.graphaf.metrics import generation_metrics, property_metrics, property_table
from apps.graphaf.module import draw_grid
from apps.graphaf.optimize import optimize
from core.paths import resolve_path
from core.training import Restored, command_loggers, fit, restore
from core.training.media import log_image, log_table
from core.training.reporting import print_metrics, resolve_device
from core.training.runner import write_json

log = logging.getLogger(__name__)


def resolve_data(cfg: DictConfig) -> MoleculeDataModule:
    """Preprocess (or load from cache) the data and write the vocabulary and size it found into ``cfg.data``, so the
    model is built to match and the checkpoint records the resolved values."""
    dm = instantiate(cfg.data)
    d = dm.load()
    with open_dict(cfg):
        cfg.data.atoms = list(d.atoms)
        cfg.data.max_atoms = int(d.max_atoms)
        if cfg.data.get("valence"):
            cfg.data.valence = {t: v for t, v in cfg.data.valence.items() if t in d.atoms}
    return dm


def graph_smiles(g: MolGraph, vocab: AtomVocab) -> tuple[str, bool]:
    """(SMILES, valid): canonical SMILES of a valid graph; for an invalid one the unsanitized SMILES (which RDKit
    refuses to parse, so a file of them scores the same in ``evaluate smiles=...``)."""
    mol = graph_to_mol(g.types, g.bonds, vocab)
    if mol is not None:
        return canonical_smiles(mol), True
    raw = graph_to_mol(g.types, g.bonds, vocab, sanitize=False)
    try:
        return Chem.MolToSmiles(raw, canonical=False, kekuleSmiles=True), False
    except Exception:  # noqa: BLE001
        return "*", False


class MinAtomsError(RuntimeError):
    """Sampling gave up: nearly every molecule the model generated was under ``min_atoms`` heavy atoms."""


def generate_smiles(
    model, n: int, batch_size: int, temperature: float, valency_check: bool, desc: str, min_atoms: int = 1
) -> tuple:
    """(smiles, valid flags, seconds, rejected) for ``n`` molecules generated in batches.

    Molecules with fewer than ``min_atoms`` heavy atoms are discarded and drawn again, as DIG's ``run_rand_gen``
    (``num_min_node``, 7 in its QM9 and ZINC250k configs); ``rejected`` counts them. ``min_atoms=1`` keeps every
    molecule.
    """
    if not 1 <= min_atoms <= model.max_atoms:
        raise ValueError(f"min_atoms={min_atoms}: expected 1 to the model's max_atoms ({model.max_atoms})")
    smiles, valid, rejected = [], [], 0
    t0 = time.perf_counter()
    with torch.no_grad(), tqdm(total=n, desc=desc, unit="mol") as bar:
        while len(smiles) < n:
            b = min(batch_size, n - len(smiles))
            for g in model.generate(b, temperature=temperature, valency_check=valency_check):
                if len(g.types) < min_atoms:
                    rejected += 1
                    continue
                s, ok = graph_smiles(g, model.vocab)
                smiles.append(s)
                valid.append(ok)
                bar.update(1)
            if rejected > 100 * max(n, batch_size):
                raise MinAtomsError(
                    f"min_atoms={min_atoms}: {rejected} molecules rejected for size against {len(smiles)} kept; "
                    "the model rarely generates molecules that large (lower min_atoms)"
                )
    return smiles, valid, time.perf_counter() - t0, rejected


def train(cfg: DictConfig) -> dict:
    """Fit GraphAF; writes checkpoints, metrics.json and (rank zero) samples.smi + samples.png from the final model."""
    dm = resolve_data(cfg)
    result = fit(cfg, datamodule=dm)
    n = cfg.get("samples_after_fit", 0)
    if result.trainer.is_global_zero and n:
        model = result.module.cpu().eval().eval_model.eval()
        torch.manual_seed(cfg.seed)
        min_atoms = min(cfg.min_atoms, model.max_atoms)
        try:
            smiles, valid, _, _ = generate_smiles(model, n, 256, cfg.module.temperature, True, "sampling", min_atoms)
        except MinAtomsError as err:  # a short run's model: the preview must not fail the finished training
            log.warning("%s; the samples after training keep every size (min_atoms=1)", err)
            min_atoms = 1
            smiles, valid, _, _ = generate_smiles(model, n, 256, cfg.module.temperature, True, "sampling", 1)
        result.metrics["samples/min_atoms"] = min_atoms
        _write_smiles(result.output_dir / "samples.smi", smiles)
        draw_grid([s for s, v in zip(smiles, valid) if v][:32], result.output_dir / "samples.png")
        m = generation_metrics([s if v else None for s, v in zip(smiles, valid)], result.datamodule.reference_smiles)
        result.metrics.update({f"samples/{k}": v for k, v in m.items()})
        write_json(result.output_dir / "metrics.json", result.metrics)
        print_metrics(f"GraphAF samples after training ({n})", m)
    return result.metrics


def _write_smiles(path: Path, smiles: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(smiles) + "\n")


def _restore(cfg: DictConfig, data_path: str | None = None) -> Restored:
    """The checkpoint ``cfg.ckpt`` (file or run directory) on ``cfg.device``; ``data_path`` replaces the training data
    file its config names (a file that has moved)."""
    overrides = {"data": {"path": str(data_path)}} if data_path else None
    return restore(cfg.ckpt, overrides, app=cfg.app, map_location=resolve_device(cfg.get("device")))


def sample(cfg: DictConfig) -> Path:
    """``n`` molecules from a checkpoint: samples.smi (one per line, invalid ones included as RDKit rejects them),
    samples.png (a grid of the first valid ones), metrics.json (validity, throughput) and a W&B table."""
    restored = _restore(cfg)
    model = restored.module.eval_model.eval()
    torch.manual_seed(cfg.seed)
    smiles, valid, secs, rejected = generate_smiles(
        model, cfg.n, cfg.batch_size, cfg.temperature, cfg.valency_check, "sampling", cfg.min_atoms
    )  # fmt: skip
    out = Path(cfg.output_dir)
    _write_smiles(out / "samples.smi", smiles)
    png = draw_grid([s for s, v in zip(smiles, valid) if v][: cfg.grid], out / "samples.png")
    result = {
        "n": cfg.n, "validity": float(np.mean(valid)), "molecules_per_s": cfg.n / secs, "ckpt": str(restored.path),
        "temperature": cfg.temperature, "valency_check": bool(cfg.valency_check),
        "min_atoms": cfg.min_atoms, "rejected_below_min_atoms": rejected,
    }  # fmt: skip
    write_json(out / "metrics.json", result)
    with command_loggers(cfg, restored.global_step) as target:
        if target is not None:
            log_table(target, "samples/smiles", ["smiles", "valid"], [[s, v] for s, v in zip(smiles, valid)])
            if png is not None:
                log_image(target, "samples/molecules", png)
    log.info("wrote %d molecules to %s (validity %.3f)", cfg.n, out / "samples.smi", result["validity"])
    return out / "samples.smi"


@torch.no_grad()
def reconstruction_rate(model, dm: MoleculeDataModule, n: int, batch_size: int = 256) -> dict[str, float]:
    """Encode ``n`` validation molecules (training ones if there are no validation ones) to latents, invert the flow
    from those latents (sequential decoding, no valency check) and compare canonical SMILES."""
    ds = dm.val_set if len(dm.val_set) else dm.train_set
    n = min(n, len(ds))
    same = 0
    for start in tqdm(range(0, n, batch_size), desc="reconstruction", unit="batch"):
        graphs = [ds[k] for k in range(start, min(n, start + batch_size))]
        batch = graphs_to_batch(graphs, model.max_atoms, model.num_types, stop_type=0)
        batch = {k: v.to(model.max_valence.device) for k, v in batch.items()}
        latents = model.encode(batch["x"], batch["adj"], batch["num_atoms"])
        decoded = model.generate(0, latents=latents, valency_check=False)
        for g, h in zip(graphs, decoded):
            a = canonical_smiles(graph_to_mol(g.types, g.bonds, model.vocab))
            same += int(a is not None and a == canonical_smiles(graph_to_mol(h.types, h.bonds, model.vocab)))
    return {"reconstruction": same / n if n else 0.0, "reconstruction_n": n}


def evaluate(cfg: DictConfig) -> dict:
    """Metrics of a checkpoint's samples (``ckpt=``) or of any SMILES file (``smiles=<file> reference=<file>``).

    Novelty is measured against every molecule of the reference: the checkpoint's whole data set (training and
    validation split, as DIG's ``RandGenEvaluator``; ``data_path=`` if its file has moved), or the ``reference`` file.
    """
    rng = np.random.default_rng(cfg.seed)
    result: dict[str, Any] = {}
    if cfg.ckpt:
        restored = _restore(cfg, cfg.get("data_path"))
        model = restored.module.eval_model.eval()
        dm = restored.datamodule
        data_file = resolve_path(dm.path)
        if not data_file.is_file():
            raise FileNotFoundError(
                f"{restored.path} was trained on {data_file}, which does not exist; give data_path=<that SMILES file>"
            )
        dm.setup("fit")
        reference = dm.reference_smiles
        result["novelty_reference"] = dm.reference_description
        torch.manual_seed(cfg.seed)
        smiles, valid, secs, rejected = generate_smiles(
            model, cfg.n, cfg.batch_size, cfg.temperature, True, "sampling (valency check)", cfg.min_atoms
        )  # fmt: skip
        raw, raw_valid, _, raw_rejected = generate_smiles(
            model, cfg.n, cfg.batch_size, cfg.temperature, False, "sampling (no check)", cfg.min_atoms
        )  # fmt: skip
        result["min_atoms"] = cfg.min_atoms
        result["rejected_below_min_atoms"] = rejected
        result["rejected_below_min_atoms_no_check"] = raw_rejected
        result["validity_without_check"] = float(np.mean(raw_valid))
        result["molecules_per_s"] = cfg.n / secs
        result.update(reconstruction_rate(model, dm, cfg.reconstruct_n))
        generated = [s if v else None for s, v in zip(smiles, valid)]
        result["source"] = str(restored.path)
        result["protocol"] = (
            f"{cfg.n} samples at temperature {cfg.temperature} (seed {cfg.seed}) with and without the valency check, "
            f"molecules under {cfg.min_atoms} heavy atoms discarded and drawn again (DIG's num_min_node; "
            f"{rejected} discarded); "
            f"uniqueness and novelty over the valid ones of the checked samples; reconstruction of "
            f"{result['reconstruction_n']} validation molecules (fixed BFS order, dequantization noise 0.5)"
        )
        _write_smiles(Path(cfg.output_dir) / "samples.smi", smiles)
    elif cfg.smiles:
        if not cfg.reference:
            raise ValueError("evaluate smiles=<file>: give reference=<training SMILES file> for novelty and properties")
        generated = [s for _, s in read_smiles(cfg.smiles, cfg.smiles_column, "smiles_column", skip_blank=True)]
        if not generated:
            raise ValueError(f"{resolve_path(cfg.smiles)}: no SMILES to evaluate (the file has no rows)")
        ref_rows = read_smiles(cfg.reference, cfg.reference_column, "reference_column", skip_blank=True)
        reference = [c for _, s in tqdm(ref_rows, desc="reference", unit="mol") if (c := canonical_smiles(s))]
        if not reference:
            raise ValueError(
                f"{resolve_path(cfg.reference)}: no molecule RDKit can parse; novelty needs a reference set"
            )
        result["source"] = str(cfg.smiles)
        result["novelty_reference"] = f"all {len(reference)} parsable molecules of {resolve_path(cfg.reference)}"
    else:
        raise ValueError("evaluate: give ckpt=<checkpoint> or smiles=<file> reference=<training file>")
    m = generation_metrics(generated, reference)
    result.update(m)
    if cfg.ckpt:
        result["validity_with_check"] = result.pop("validity")
    ref_sample = list(rng.choice(reference, min(cfg.reference_n, len(reference)), replace=False))
    gen_valid = [canonical_smiles(s) for s in generated if s]
    gen_valid = [s for s in gen_valid if s]
    props = property_metrics(property_table(gen_valid, True), property_table(ref_sample, True))
    result.update(props)
    out = Path(cfg.output_dir)
    write_json(out / "metrics.json", result)
    draw_grid(gen_valid[:32], out / "samples.png")
    print_metrics("GraphAF evaluation", {k: v for k, v in result.items() if not isinstance(v, str)})
    return result


COMMANDS = {"train": train, "sample": sample, "evaluate": evaluate, "optimize": optimize}
DESCRIPTIONS = {
    "train": "fit GraphAF on a SMILES file (data=qm9 | zinc250k | smiles data.path=... data.column=...)",
    "sample": "ckpt=<file or run dir> n=10000 [temperature=0.75 valency_check=true min_atoms=7]: samples.smi, "
    "samples.png",
    "evaluate": "ckpt=... n=10000, or smiles=<file> reference=<training file>: validity, uniqueness, novelty, "
    "reconstruction, QED / penalized logP / SA distributions",
    "optimize": "ckpt=... property=plogp|qed steps=60: RL (PPO) fine-tuning for a property; top-3 scores, "
    "mean before/after, a fine-tuned checkpoint for sample/evaluate",
}
