"""``optimize``: property optimisation of a trained GraphAF by reinforcement-learning fine-tuning (GraphAF section 4.3).

The generation policy is the flow itself: every step (an atom type, a bond category) is an action taken with the
flow's likelihood in the context of the partial graph. One iteration:

1. Roll out ``batch_size`` molecules with the *old* policy (the batched sampler, valency check on). The sampler
   records the bonds the valency check refused and the type of the atom that stopped generation, so the whole
   trajectory is known.
2. Rewards: the final molecule scores ``R = valid_bonus + f(property)`` (``f``: ``linear_coeff * x`` or
   ``exp(x / exp_temperature) - exp_bias``) or ``invalid_reward`` if RDKit rejects it; a step of atom ``i``
   gets ``R * reward_decay ** (last - i)`` (``last`` the index of the trajectory's last atom, the stop atom
   included), and every refused bond gets the valency penalty ``bond_penalty``. (Default ``reward_decay`` 1: with
   the per-index baseline a discount rewards length by itself; see ``conf/graphaf/optimize.yaml``.)
3. A moving baseline per atom index (``moving_coeff``) turns rewards into advantages ``A``.
4. The PPO-clip objective on the ratio of new to old step likelihoods, ``min(r A, clip(r, 1-eps, 1+eps) A)``,
   averaged over all steps; one Adam step. The step likelihoods are recomputed differentiably with teacher forcing
   on the generated graphs in generation order (:meth:`GraphAF.step_log_likelihoods`, exact: the flow is
   invertible), dequantization noise at the cell centre so the ratio is deterministic.
5. Every ``old_update_interval`` iterations the old policy takes the new weights (0: the old policy stays the
   frozen pretrained model).

Differences from the reference implementation: the stop atom's type is not an action of the likelihood (the model
marginalises it), and the ZINC/steric-strain filters of the reference reward are not applied.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import Tensor
from tqdm import tqdm

from apps.graphaf.chem import NUM_BOND_TYPES, MolGraph, canonical_smiles, graph_to_mol, penalized_logp, qed
from apps.graphaf.data import graphs_to_batch
from apps.graphaf.model import GraphAF
from core.training import restore
from core.training.reporting import resolve_device
from core.training.runner import write_json

__all__ = ["OBJECTIVES", "RLSettings", "Rollout", "PolicyOptimizer", "PropertyReward", "top_k", "optimize"]

log = logging.getLogger(__name__)

OBJECTIVES = {"plogp": penalized_logp, "qed": qed}


@dataclass
class RLSettings:
    """Fine-tuning hyper-parameters (the paper's / DIG's values in ``conf/graphaf/optimize.yaml``)."""

    temperature: float = 0.75
    clip_eps: float = 0.2
    reward_decay: float = 1.0
    moving_coeff: float = 0.9
    bond_penalty: float = -1.0
    old_update_interval: int = 4
    grad_clip: float | None = 1.0
    max_log_ratio: float = 5.0


class PropertyReward:
    """Final reward of a generated graph, cached by canonical SMILES: ``(reward, score, smiles)``; score and SMILES
    are None for a molecule RDKit rejects."""

    def __init__(
        self,
        vocab,
        prop: str,
        reward_type: str = "auto",
        valid_bonus: float = 2.0,
        invalid_reward: float = -3.0,
        linear_coeff: float = 2.0,
        exp_temperature: float = 3.0,
        exp_bias: float = 4.0,
    ) -> None:
        if prop not in OBJECTIVES:
            raise ValueError(f"property: unknown property {prop!r}; choose one of {sorted(OBJECTIVES)}")
        if reward_type == "auto":
            reward_type = "exp" if prop == "plogp" else "linear"
        if reward_type not in ("exp", "linear"):
            raise ValueError(f"reward_type: {reward_type!r} is not one of auto, exp, linear")
        self.vocab, self.prop, self.fn, self.reward_type = vocab, prop, OBJECTIVES[prop], reward_type
        self.valid_bonus, self.invalid_reward = valid_bonus, invalid_reward
        self.linear_coeff, self.exp_temperature, self.exp_bias = linear_coeff, exp_temperature, exp_bias
        self._cache: dict[str, float] = {}

    def shape(self, score: float) -> float:
        if self.reward_type == "linear":
            return self.valid_bonus + self.linear_coeff * score
        return self.valid_bonus + math.exp(score / self.exp_temperature) - self.exp_bias

    def score(self, g: MolGraph) -> tuple[float | None, str | None]:
        mol = graph_to_mol(g.types, g.bonds, self.vocab)
        smi = canonical_smiles(mol) if mol is not None else None
        if smi is None:
            return None, None
        if smi not in self._cache:
            try:
                self._cache[smi] = self.fn(mol)
            except Exception:  # noqa: BLE001  (RDKit descriptors fail on a few exotic molecules)
                log.warning("%s failed on %s", self.prop, smi)
                return None, None
        return self._cache[smi], smi

    def __call__(self, g: MolGraph) -> tuple[float, float | None, str | None]:
        s, smi = self.score(g)
        return (self.invalid_reward if s is None else self.shape(s)), s, smi


@dataclass
class Rollout:
    """Generated trajectories as a teacher-forcing batch, with what the graphs alone do not show."""

    graphs: list[MolGraph]
    x: Tensor  # (B, L) types, the stop atom's sampled type at index n
    adj: Tensor  # (B, L, L)
    num_atoms: Tensor  # (B,)
    rejected: Tensor  # (B, S, 3) refused bond types per edge step of the plan of width L
    reward: Tensor  # (B,) final reward
    scores: list[float | None]
    smiles: list[str | None]


class PolicyOptimizer:
    """PPO-clip fine-tuning of ``model`` (in place) for ``reward_fn(graph) -> (reward, score, smiles)``."""

    def __init__(
        self,
        model: GraphAF,
        reward_fn: Callable[[MolGraph], tuple[float, float | None, str | None]],
        lr: float = 1e-4,
        settings: RLSettings | None = None,
    ) -> None:
        self.model, self.reward_fn = model, reward_fn
        self.settings = settings or RLSettings()
        self.old = copy.deepcopy(model).requires_grad_(False).eval()
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.baseline: Tensor | None = None  # (max_atoms,) per atom index
        self.iteration = 0

    @torch.no_grad()
    def rollout(self, n: int) -> Rollout:
        record: dict[str, Tensor] = {}
        graphs = self.old.generate(n, self.settings.temperature, valency_check=True, record=record)
        batch = graphs_to_batch(graphs, self.model.max_atoms, self.model.num_types, stop_type=0)
        x, adj, num_atoms = batch["x"], batch["adj"], batch["num_atoms"]
        width = x.shape[1]
        stop = record["stop_type"].cpu()
        rows = (num_atoms < width).nonzero().squeeze(1)
        x[rows, num_atoms[rows]] = stop[rows]  # the type the sampler actually drew for the stop atom
        plan = self.model.plan(width)
        rejected = record["rejected"][:, plan.ei, plan.ei - plan.ej - 1].cpu()  # (B, S, 3)
        out = [self.reward_fn(g) for g in graphs]
        dev = self.model.max_valence.device
        return Rollout(
            graphs, x.to(dev), adj.to(dev), num_atoms.to(dev), rejected.to(dev),
            torch.tensor([r for r, _, _ in out], dtype=torch.float, device=dev),
            [s for _, s, _ in out], [smi for _, _, smi in out],
        )  # fmt: skip

    def step_rewards(self, ro: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        """Discounted rewards of node steps (B, L) and edge steps (B, S), and the atom index of each edge step."""
        s = self.settings
        width = ro.x.shape[1]
        last = torch.where(ro.num_atoms < self.model.max_atoms, ro.num_atoms, ro.num_atoms - 1)  # (B,)
        pos = torch.arange(width, device=ro.x.device)
        expo = (last.unsqueeze(1) - pos.unsqueeze(0)).clamp(min=0).float()
        node_r = ro.reward.unsqueeze(1) * s.reward_decay**expo  # (B, L)
        ei = self.model.plan(width).ei
        return node_r, node_r[:, ei], ei

    def _update_baseline(self, values: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        """Moving average per atom index of this batch's step rewards; returns the baseline per atom index."""
        m = self.model.max_atoms
        tot = torch.zeros(m, device=values.device).index_add_(0, index, values * weight)
        cnt = torch.zeros(m, device=values.device).index_add_(0, index, weight)
        mean = tot / cnt.clamp(min=1)
        seen = cnt > 0
        if self.baseline is None:
            self.baseline = torch.where(seen, mean, torch.zeros_like(mean))
        else:
            c = self.settings.moving_coeff
            self.baseline = torch.where(seen, c * self.baseline + (1 - c) * mean, self.baseline)
        return self.baseline

    def actions(self, ro: Rollout) -> dict[str, Tensor]:
        """Every action of the rollout, flat: node steps, taken edge categories and refused bond categories, with
        ``lp_new`` (differentiable) / ``lp_old`` log-likelihoods, ``reward``, ``atom`` index and ``weight`` (1, or
        how often a bond type was refused)."""
        new = self.model.step_log_likelihoods(ro.x, ro.adj, ro.num_atoms)
        with torch.no_grad():
            old = self.old.step_log_likelihoods(ro.x, ro.adj, ro.num_atoms)
        node_r, edge_r, ei = self.step_rewards(ro)
        b, width = ro.x.shape
        dev = ro.x.device
        nm, em = new["node_mask"], new["edge_mask"]
        taken = ro.adj[:, ei, self.model.plan(width).ej].unsqueeze(-1)  # (B, S, 1)

        def flat(d: dict[str, Tensor]) -> Tensor:
            return torch.cat(
                [d["node"][nm], d["edge"].gather(2, taken).squeeze(2)[em], d["edge"][..., :3][em].flatten()]
            )

        n_rej = int(em.sum()) * NUM_BOND_TYPES
        reward = torch.cat([node_r[nm], edge_r[em], torch.full((n_rej,), self.settings.bond_penalty, device=dev)])
        atom_e = ei.expand(b, -1)[em]
        atom = torch.cat([torch.arange(width, device=dev).expand(b, width)[nm], atom_e, atom_e.repeat_interleave(3)])
        weight = torch.cat([torch.ones(int(nm.sum() + em.sum()), device=dev), ro.rejected[em].flatten().float()])
        keep = weight > 0
        out = {"lp_new": flat(new), "lp_old": flat(old), "reward": reward, "atom": atom, "weight": weight}
        return {k: v[keep] for k, v in out.items()}

    def loss(self, ro: Rollout) -> tuple[Tensor, dict[str, float]]:
        """The PPO-clip loss (to minimise) over every action of the rollout (updating the baseline), and statistics."""
        eps = self.settings.clip_eps
        act = self.actions(ro)
        lp_new, lp_old, reward, atom, weight = (act[k] for k in ("lp_new", "lp_old", "reward", "atom", "weight"))
        b = ro.x.shape[0]
        baseline = self._update_baseline(reward, atom, weight)
        adv = reward - baseline[atom]
        # the step likelihoods are flow densities: their log-ratio can be large after one step; beyond e^+-max_log_ratio
        # the ratio is held constant (no gradient, as the clip intends), which keeps the loss finite
        m = self.settings.max_log_ratio
        ratio = torch.exp((lp_new - lp_old).clamp(-m, m))
        obj = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        loss = -(weight * obj).sum() / weight.sum()
        stats = {
            "loss": float(loss.detach()),
            "ratio_mean": float((weight * ratio.detach()).sum() / weight.sum()),
            "clipped": float((weight * ((ratio.detach() - 1).abs() > eps)).sum() / weight.sum()),
            "refused_bonds_per_mol": float(ro.rejected.sum()) / b,
        }
        return loss, stats

    def step(self, n: int) -> tuple[Rollout, dict[str, float]]:
        """One iteration: sync the old policy when due, roll out ``n`` molecules, one optimiser step."""
        k = self.settings.old_update_interval
        if k and self.iteration % k == 0:
            self.old.load_state_dict(self.model.state_dict())
        ro = self.rollout(n)
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = self.loss(ro)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.grad).all()) for p in params)
        if finite:
            if self.settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
            self.optimizer.step()
        else:
            log.warning("iteration %d: non-finite loss or gradient, update skipped", self.iteration + 1)
        stats["skipped"] = float(not finite)
        self.iteration += 1
        valid = [s for s in ro.scores if s is not None]
        stats.update(
            reward_mean=float(ro.reward.mean()),
            property_mean=float(np.mean(valid)) if valid else float("nan"),
            validity=len(valid) / n,
        )
        return ro, stats


def top_k(smiles: Sequence[str | None], scores: Sequence[float | None], k: int = 3) -> list[dict[str, Any]]:
    """The ``k`` best unique valid molecules: ``[{"smiles", "score"}]`` best first."""
    best: dict[str, float] = {}
    for smi, s in zip(smiles, scores):
        if smi is not None and s is not None:
            best[smi] = s
    return [{"smiles": smi, "score": s} for smi, s in sorted(best.items(), key=lambda t: -t[1])[:k]]


@torch.no_grad()
def _evaluate(model: GraphAF, reward: PropertyReward, n: int, batch_size: int, temperature: float, desc: str) -> dict:
    smiles, scores = [], []
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch"):
        for g in model.generate(min(batch_size, n - start), temperature=temperature, valency_check=True):
            s, smi = reward.score(g)
            smiles.append(smi)
            scores.append(s)
    valid = [s for s in scores if s is not None]
    return {
        "n": n,
        "validity": len(valid) / n if n else 0.0,
        "uniqueness": len({s for s in smiles if s}) / len(valid) if valid else 0.0,
        "mean": float(np.mean(valid)) if valid else float("nan"),
        "top3": top_k(smiles, scores, 3),
        "smiles": smiles,
    }


def optimize(cfg: DictConfig) -> dict:
    """Fine-tune ``ckpt`` for ``property``; writes checkpoints/last.ckpt (accepted by sample/evaluate), metrics.json
    (top-3 before/after/during, mean property before/after, per-iteration history) and samples.smi."""
    if cfg.property not in OBJECTIVES:
        raise ValueError(f"property: unknown property {cfg.property!r}; choose one of {sorted(OBJECTIVES)}")
    if not cfg.get("ckpt"):
        raise ValueError("ckpt: give the trained GraphAF checkpoint (file or run directory) to fine-tune")
    torch.manual_seed(cfg.seed)
    dev = resolve_device(cfg.get("device"))
    restored = restore(cfg.ckpt, app=cfg.app, map_location=dev)
    module, ckpt_cfg = restored.module, restored.cfg
    policy: GraphAF = module.eval_model.eval()
    r = cfg.reward
    reward = PropertyReward(
        policy.vocab, cfg.property, r.type, r.valid_bonus, r.invalid_reward, r.linear_coeff, r.exp_temperature,
        r.exp_bias,
    )  # fmt: skip
    settings = RLSettings(
        cfg.temperature, cfg.clip_eps, r.decay, cfg.moving_coeff, r.bond_penalty, cfg.old_update_interval, cfg.grad_clip
    )  # fmt: skip
    t0 = time.perf_counter()
    before = _evaluate(policy, reward, cfg.eval_n, cfg.eval_batch_size, cfg.temperature, "before")
    opt = PolicyOptimizer(policy, reward, cfg.lr, settings)
    history, seen_smiles, seen_scores = [], [], []
    bar = tqdm(range(cfg.steps), desc=f"optimize {cfg.property}", unit="it")
    for it in bar:
        ro, stats = opt.step(cfg.batch_size)
        seen_smiles += ro.smiles
        seen_scores += ro.scores
        history.append({"iteration": it + 1, **stats})
        bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", prop=f"{stats['property_mean']:.3f}")
        if cfg.log_every and (it + 1) % cfg.log_every == 0:
            log.info("iteration %d: %s", it + 1, {k: round(v, 4) for k, v in stats.items()})
    policy.eval()
    after = _evaluate(policy, reward, cfg.eval_n, cfg.eval_batch_size, cfg.temperature, "after")
    secs = time.perf_counter() - t0

    out = Path(cfg.output_dir)
    ckpt_path = _save(module, policy, ckpt_cfg, cfg, out / "checkpoints" / "last.ckpt")
    (out / "samples.smi").write_text("\n".join(s or "*" for s in after.pop("smiles")) + "\n")
    before.pop("smiles")
    result = {
        "property": cfg.property,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "before": before,
        "after": after,
        "top3": after["top3"],
        "top3_during_training": top_k(seen_smiles, seen_scores, 3),
        "history": history,
        "seconds": secs,
        "source_ckpt": str(cfg.ckpt),
        "ckpt": str(ckpt_path),
    }
    write_json(out / "metrics.json", result)
    _report(result)
    return result


def _save(module, policy: GraphAF, ckpt_cfg: DictConfig, cfg: DictConfig, path: Path) -> Path:
    """A flowsuite checkpoint of the fine-tuned weights (in the module's model and, if any, its EMA copy)."""
    if module.ema is not None:
        module.model.load_state_dict(policy.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "flowsuite_config": OmegaConf.to_container(ckpt_cfg, resolve=True),
        "state_dict": {k: v.cpu() for k, v in module.state_dict().items()},
        "graphaf_optimize": OmegaConf.to_container(cfg, resolve=True),
    }
    torch.save(state, path)
    log.info("wrote the fine-tuned checkpoint %s", path)
    return path


def _report(result: dict) -> None:
    p, b, a = result["property"], result["before"], result["after"]
    log.info("%s mean %.4f -> %.4f (validity %.3f -> %.3f) in %.1f s", p, b["mean"], a["mean"], b["validity"],
             a["validity"], result["seconds"])  # fmt: skip
    for name in ("before", "after"):
        log.info("top-3 %s: %s", name, ", ".join(f"{t['score']:.3f} {t['smiles']}" for t in result[name]["top3"]))
    summary = Table(title=f"GraphAF property optimisation ({p}, {result['steps']} iterations)")
    for col in ("", "before", "after"):
        summary.add_column(col, justify="right" if col else "left")
    for k in ("mean", "validity", "uniqueness", "n"):
        summary.add_row(f"{p} {k}" if k == "mean" else k, *(f"{d[k]:.4g}" for d in (b, a)))
    top = Table(title=f"top-3 {p} (unique valid molecules)")
    for col in ("rank", "before", "after", "during fine-tuning"):
        top.add_column(col)
    lists = [b["top3"], a["top3"], result["top3_during_training"]]
    for i in range(3):
        top.add_row(str(i + 1), *(f"{t[i]['score']:.3f}  {t[i]['smiles']}" if i < len(t) else "-" for t in lists))
    console = Console()
    console.print(summary)
    console.print(top)
