"""``optimize``: property optimisation of a trained GraphAF by reinforcement-learning fine-tuning (GraphAF section 4.3),
trained by Lightning like every other run (manual optimisation): checkpoints, resume (``ckpt_path=``), CSV/W&B logging
and DDP come from :func:`core.training.fit`.

The generation policy is the flow itself: every step (an atom type, a bond category) is an action taken with the
flow's likelihood in the context of the partial graph. One iteration (:class:`PolicyModule`, DIG's
``reinforce_forward_optim``):

1. Roll out ``rollout_size`` molecules of up to ``max_atoms`` atoms (DIG: 48) with the *old* policy (the batched
   sampler, valency check on). The sampler records the bonds the valency check refused.
2. Rewards: the final molecule scores ``R = valid_bonus + f(property)`` (``f``: ``linear_coeff * x`` or
   ``exp(x / exp_temperature) - exp_bias``) or ``invalid_reward`` if RDKit rejects it; a step of atom ``i`` gets
   ``R * reward_decay ** (last - i)`` (``last`` the index of the molecule's last atom; DIG: 0.9 for plogp, 0.97 for
   qed), and every refused bond the valency penalty ``bond_penalty``.
3. The stop step is not an action: the atom that ended generation (it got no bond) and its edge steps are dropped
   from the trajectory, as DIG drops the final unconnected atom's node and edge data.
4. Advantages: the rewards themselves (``baseline: none``, DIG's ``no_baseline: true``), or rewards minus a moving
   average per atom index (``baseline: moving``, ``moving_coeff``).
5. The PPO-clip objective on the ratio of new to old step likelihoods, ``min(r A, clip(r, 1-eps, 1+eps) A)``,
   averaged over all actions; one Adam step. The step likelihoods are recomputed differentiably with teacher forcing
   on the generated graphs in generation order (:meth:`GraphAF.step_log_likelihoods`, exact: the flow is
   invertible), dequantization noise at the cell centre so the ratio is deterministic, batch-norm on its running
   statistics (DIG puts its BatchNorm in eval mode during RL).
6. Every ``old_update_interval`` iterations the old policy takes the new weights (0: the old policy stays the
   frozen pretrained model).

Differences from the reference implementation: the ZINC/steric-strain filters of the reference reward are not
applied.
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

import lightning.pytorch as pl
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from apps.graphaf.chem import NUM_BOND_TYPES, MolGraph, canonical_smiles, graph_to_mol, penalized_logp, qed
from apps.graphaf.data import graphs_to_batch
from apps.graphaf.model import GraphAF
from apps.graphaf.module import GraphAFModule
from core.training import fit, restore
from core.training.runner import write_json

__all__ = ["OBJECTIVES", "Rollout", "PolicyModule", "RolloutData", "PropertyReward", "top_k", "optimize"]

log = logging.getLogger(__name__)

OBJECTIVES = {"plogp": penalized_logp, "qed": qed}


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


class PolicyModule(GraphAFModule):
    """PPO-clip fine-tuning of ``model`` for a property, a LightningModule with manual optimisation.

    Arguments:
        model: the pretrained GraphAF (its ``max_atoms`` is the largest molecule a rollout may grow to).
        property: ``plogp`` or ``qed`` (:data:`OBJECTIVES`); ``reward`` the keyword arguments of
            :class:`PropertyReward` plus ``decay`` (``auto``: 0.9 for plogp, 0.97 for qed) and ``bond_penalty``.
        rollout_size: molecules rolled out per iteration (DIG: 8).
        clip_eps: PPO clip range; ``max_log_ratio``: beyond ``e^+-max_log_ratio`` the ratio is held constant.
        old_update_interval: copy the new weights into the old policy every k iterations (0: frozen pretrained).
        baseline: ``none`` (DIG's ``no_baseline: true``) or ``moving`` (a moving average per atom index).
        grad_clip: clip the gradient norm (None: no clipping; DIG does not clip).
        Other arguments (optimizer, ...) go to :class:`GraphAFModule` / :class:`core.training.FlowModule`.
    """

    def __init__(
        self,
        model: GraphAF,
        property: str = "plogp",  # noqa: A002  (the config key users know)
        reward: dict | None = None,
        rollout_size: int = 8,
        clip_eps: float = 0.2,
        max_log_ratio: float = 5.0,
        old_update_interval: int = 4,
        baseline: str = "none",
        moving_coeff: float = 0.99,
        grad_clip: float | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("num_samples", 0)
        super().__init__(model, **kwargs)
        self.automatic_optimization = False
        if baseline not in ("none", "moving"):
            raise ValueError(f"baseline must be none or moving, got {baseline!r}")
        r = dict(reward or {})
        decay = r.pop("decay", "auto")
        self.reward_decay = float({"plogp": 0.9, "qed": 0.97}.get(property, 1.0) if decay == "auto" else decay)
        self.bond_penalty = float(r.pop("bond_penalty", -1.0))
        r["reward_type"] = r.pop("type", r.get("reward_type", "auto"))
        self.reward_fn: Callable[[MolGraph], tuple[float, float | None, str | None]] = PropertyReward(
            model.vocab, property, **r
        )
        self.property, self.rollout_size, self.clip_eps, self.max_log_ratio = (
            property,
            rollout_size,
            clip_eps,
            max_log_ratio,
        )
        self.old_update_interval, self.baseline_kind, self.moving_coeff = old_update_interval, baseline, moving_coeff
        self.grad_clip = grad_clip
        self.old = copy.deepcopy(model).requires_grad_(False).eval()
        self.baseline: Tensor | None = None  # (max_atoms,) per atom index, with baseline=moving
        self.seen: list[tuple[str | None, float | None]] = []  # (smiles, score) of every rollout on this rank
        self.history: list[dict[str, float]] = []  # per-iteration statistics on this rank

    # ---- one iteration --------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, n: int) -> Rollout:
        record: dict[str, Tensor] = {}
        graphs = self.old.generate(n, self.temperature, valency_check=True, record=record)
        batch = graphs_to_batch(graphs, self.model.max_atoms, self.model.num_types, stop_type=0)
        x, adj, num_atoms = batch["x"], batch["adj"], batch["num_atoms"]
        width = x.shape[1]
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
        width = ro.x.shape[1]
        last = ro.num_atoms - 1  # the molecule's last atom (the stop atom is no action)
        pos = torch.arange(width, device=ro.x.device)
        expo = (last.unsqueeze(1) - pos.unsqueeze(0)).clamp(min=0).float()
        node_r = ro.reward.unsqueeze(1) * self.reward_decay**expo  # (B, L)
        ei = self.model.plan(width).ei
        return node_r, node_r[:, ei], ei

    def _advantages(self, values: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        if self.baseline_kind == "none":
            return values
        m = self.model.max_atoms
        tot = torch.zeros(m, device=values.device).index_add_(0, index, values * weight)
        cnt = torch.zeros(m, device=values.device).index_add_(0, index, weight)
        mean, seen = tot / cnt.clamp(min=1), cnt > 0
        if self.baseline is None:
            self.baseline = torch.where(seen, mean, torch.zeros_like(mean))
        else:
            c = self.moving_coeff
            self.baseline = torch.where(seen, c * self.baseline + (1 - c) * mean, self.baseline)
        return values - self.baseline[index]

    def actions(self, ro: Rollout) -> dict[str, Tensor]:
        """Every action of the rollout, flat: node steps, taken edge categories and refused bond categories of the
        molecule's atoms (not of the stop atom), with ``lp_new`` (differentiable) / ``lp_old`` log-likelihoods,
        ``reward``, ``atom`` index and ``weight`` (1, or how often a bond type was refused)."""
        new = self.model.step_log_likelihoods(ro.x, ro.adj, ro.num_atoms)
        with torch.no_grad():
            old = self.old.step_log_likelihoods(ro.x, ro.adj, ro.num_atoms)
        node_r, edge_r, ei = self.step_rewards(ro)
        b, width = ro.x.shape
        dev = ro.x.device
        n = ro.num_atoms.unsqueeze(1)
        nm = new["node_mask"] & (torch.arange(width, device=dev).unsqueeze(0) < n)  # the stop atom is no action
        em = new["edge_mask"] & (ei.unsqueeze(0) < n)
        taken = ro.adj[:, ei, self.model.plan(width).ej].unsqueeze(-1)  # (B, S, 1)

        def flat(d: dict[str, Tensor]) -> Tensor:
            return torch.cat(
                [d["node"][nm], d["edge"].gather(2, taken).squeeze(2)[em], d["edge"][..., :3][em].flatten()]
            )

        n_rej = int(em.sum()) * NUM_BOND_TYPES
        reward = torch.cat([node_r[nm], edge_r[em], torch.full((n_rej,), self.bond_penalty, device=dev)])
        atom_e = ei.expand(b, -1)[em]
        atom = torch.cat([torch.arange(width, device=dev).expand(b, width)[nm], atom_e, atom_e.repeat_interleave(3)])
        weight = torch.cat([torch.ones(int(nm.sum() + em.sum()), device=dev), ro.rejected[em].flatten().float()])
        keep = weight > 0
        out = {"lp_new": flat(new), "lp_old": flat(old), "reward": reward, "atom": atom, "weight": weight}
        return {k: v[keep] for k, v in out.items()}

    def policy_loss(self, ro: Rollout) -> tuple[Tensor, dict[str, float]]:
        """The PPO-clip loss (to minimise) over every action of the rollout, and statistics."""
        eps = self.clip_eps
        act = self.actions(ro)
        lp_new, lp_old, reward, atom, weight = (act[k] for k in ("lp_new", "lp_old", "reward", "atom", "weight"))
        adv = self._advantages(reward, atom, weight)
        # the step likelihoods are flow densities: their log-ratio can be large after one step; beyond e^+-max_log_ratio
        # the ratio is held constant (no gradient, as the clip intends), which keeps the loss finite
        m = self.max_log_ratio
        ratio = torch.exp((lp_new - lp_old).clamp(-m, m))
        obj = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        loss = -(weight * obj).sum() / weight.sum()
        valid = [s for s in ro.scores if s is not None]
        stats = {
            "ratio_mean": float((weight * ratio.detach()).sum() / weight.sum()),
            "clipped": float((weight * ((ratio.detach() - 1).abs() > eps)).sum() / weight.sum()),
            "refused_bonds_per_mol": float(ro.rejected.sum()) / len(ro.graphs),
            "reward_mean": float(ro.reward.mean()),
            "property_mean": float(np.mean(valid)) if valid else float("nan"),
            "validity": len(valid) / len(ro.graphs),
            "atoms_mean": float(ro.num_atoms.float().mean()),
        }
        return loss, stats

    # ---- Lightning ------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.model.eval()  # batch-norm on its running statistics during RL, as DIG

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.model.eval()
        k = self.old_update_interval
        if k and self.global_step % k == 0:
            self.old.load_state_dict(self.model.state_dict())
        ro = self.rollout(self.rollout_size)
        self.seen += list(zip(ro.smiles, ro.scores))
        loss, stats = self.policy_loss(ro)
        self._guard_finite({"policy_loss": loss})
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        if self.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.history.append({"iteration": int(self.global_step), "loss": float(loss.detach()), **stats})
        self.log("rl/loss", loss.detach(), prog_bar=True, batch_size=self.rollout_size)
        for key, v in stats.items():
            if v == v:  # NaN property mean of an all-invalid batch: not logged
                self.log(f"rl/{key}", v, prog_bar=key == "property_mean", batch_size=self.rollout_size)
        return loss.detach()


class RolloutData(pl.LightningDataModule):
    """The optimize run's "data": ``steps`` empty items, one per iteration (the rollouts are generated, not read)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = int(steps)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.steps), batch_size=1)


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
    """Fine-tune ``ckpt`` for ``property`` with :func:`core.training.fit`: checkpoints (``checkpoints/``, accepted by
    sample / evaluate / restore), resume with ``ckpt_path=<this run>``, the configured logger; metrics.json holds the
    top-3 before / after / during fine-tuning, the mean property before / after and the per-iteration history."""
    if cfg.property not in OBJECTIVES:
        raise ValueError(f"property: unknown property {cfg.property!r}; choose one of {sorted(OBJECTIVES)}")
    if not cfg.get("ckpt"):
        raise ValueError("ckpt: give the trained GraphAF checkpoint (file or run directory) to fine-tune")
    torch.manual_seed(cfg.seed)
    overrides = {"model": {"max_atoms": int(cfg.max_atoms)}} if cfg.get("max_atoms") else None
    restored = restore(cfg.ckpt, overrides, app=cfg.app, map_location="cpu")
    policy: GraphAF = copy.deepcopy(restored.module.eval_model).eval()  # the EMA weights when there are some
    run_cfg = OmegaConf.merge(
        restored.cfg,
        {
            "module": {
                "_target_": f"{__name__}.PolicyModule",
                "property": cfg.property,
                **OmegaConf.to_container(cfg.module, resolve=True),
            },
            "optimize": {"source_ckpt": str(restored.path), "source_step": restored.global_step},
        },
    )
    for key in ("trainer", "logger", "callbacks"):
        node = cfg.get(key)
        run_cfg[key] = OmegaConf.to_container(node, resolve=True) if node is not None else None
    with open_dict(run_cfg):
        for key in ("app", "command", "output_dir", "seed", "ckpt_path"):
            run_cfg[key] = cfg.get(key)
        run_cfg.test_after_fit = False
    module = instantiate(run_cfg.module, model=policy)
    module.run_config = OmegaConf.to_container(run_cfg, resolve=True)
    reward = module.reward_fn
    t0 = time.perf_counter()
    before = _evaluate(policy, reward, cfg.eval_n, cfg.eval_batch_size, module.temperature, "before")
    result = fit(run_cfg, datamodule=RolloutData(cfg.steps), module=module)
    out = Path(cfg.output_dir)
    ckpt_path = out / "checkpoints" / "last.ckpt"
    result.trainer.save_checkpoint(ckpt_path)  # the final weights, through core's checkpoint plugin
    if not result.trainer.is_global_zero:
        return {}
    policy = module.model.eval()
    after = _evaluate(policy, reward, cfg.eval_n, cfg.eval_batch_size, module.temperature, "after")
    secs = time.perf_counter() - t0
    (out / "samples.smi").write_text("\n".join(s or "*" for s in after.pop("smiles")) + "\n")
    before.pop("smiles")
    seen_smiles, seen_scores = zip(*module.seen) if module.seen else ((), ())
    report = {
        "property": cfg.property,
        "steps": int(result.trainer.global_step),
        "rollout_size": int(module.rollout_size),
        "max_atoms": int(policy.max_atoms),
        "before": before,
        "after": after,
        "top3": after["top3"],
        "top3_during_training": top_k(seen_smiles, seen_scores, 3),
        "history": module.history,
        "seconds": secs,
        "source_ckpt": str(restored.path),
        "ckpt": str(ckpt_path),
        "protocol": f"{cfg.eval_n} molecules generated before and after at temperature {module.temperature} "
        "(valency check on); top-3 over unique valid molecules",
    }
    write_json(out / "metrics.json", report)
    _report(report)
    return report


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
