"""Generation metrics for molecules, one implementation for GraphAF samples and any other generator's SMILES.

Definitions (GraphAF / GCPN / MoFlow papers):
* validity: fraction of generated molecules RDKit sanitizes (``None`` or an unparsable SMILES is invalid);
* uniqueness: distinct canonical SMILES among the valid ones / valid;
* novelty: valid molecules whose canonical SMILES is not in the training set / valid
  (``novelty_unique``: the same over the distinct valid ones);
* property distributions (QED, penalized logP, SA): mean and std of generated vs reference, and the 1-D
  Wasserstein distance between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from rdkit import Chem
from scipy.stats import wasserstein_distance
from tqdm import tqdm

from apps.graphaf.chem import canonical_smiles, penalized_logp, qed, sa_score

__all__ = ["generation_metrics", "property_table", "property_metrics", "PROPERTIES"]

PROPERTIES = {"qed": qed, "plogp": penalized_logp, "sa": sa_score}


def generation_metrics(smiles: Sequence[str | None], training: Iterable[str]) -> dict[str, float]:
    """Validity, uniqueness and novelty of ``smiles`` (canonicalised here) against ``training`` (canonical)."""
    n = len(smiles)
    canon = [canonical_smiles(s) if s else None for s in smiles]
    valid = [c for c in canon if c]
    unique = set(valid)
    train = set(training)
    novel = [c for c in valid if c not in train]
    return {
        "n": n,
        "validity": len(valid) / n if n else 0.0,
        "uniqueness": len(unique) / len(valid) if valid else 0.0,
        "novelty": len(novel) / len(valid) if valid else 0.0,
        "novelty_unique": len(unique - train) / len(unique) if unique else 0.0,
    }


def property_table(smiles: Sequence[str], progress: bool = False) -> dict[str, np.ndarray]:
    """QED, penalized logP and SA of every parsable SMILES (unparsable ones are left out)."""
    out: dict[str, list[float]] = {k: [] for k in PROPERTIES}
    for s in tqdm(smiles, desc="properties", unit="mol", disable=not progress, leave=False):
        mol = Chem.MolFromSmiles(s) if s else None
        if mol is None:
            continue
        for k, f in PROPERTIES.items():
            out[k].append(f(mol))
    return {k: np.asarray(v) for k, v in out.items()}


def property_metrics(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Per property: generated mean/std, reference mean/std, and their Wasserstein-1 distance."""
    out: dict[str, float] = {}
    for k in PROPERTIES:
        g, r = generated.get(k, np.zeros(0)), reference.get(k, np.zeros(0))
        if len(g):
            out[f"{k}_mean"], out[f"{k}_std"] = float(g.mean()), float(g.std())
        if len(r):
            out[f"{k}_ref_mean"], out[f"{k}_ref_std"] = float(r.mean()), float(r.std())
        if len(g) and len(r):
            out[f"{k}_w1"] = float(wasserstein_distance(g, r))
    return out
