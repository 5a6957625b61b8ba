"""GraphAF ``optimize``: RL fine-tuning raises a reward, PPO = REINFORCE at the first step, the CLI end to end."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from apps.graphaf.data import graphs_to_batch
from apps.graphaf.model import GraphAF
from apps.graphaf.optimize import PolicyModule, PropertyReward, RolloutData, top_k
from core.cli import compose
from core.training import build_module, restore, save_checkpoint
from tests.helpers import run_cli

TINY = ["model.hidden=16", "model.rgcn_layers=2", "model.flow_layers=2", "model.st_hidden=[16]"]


def tiny_model(seed: int = 0) -> GraphAF:
    torch.manual_seed(seed)
    return GraphAF(["C", "N", "O", "F"], 9, hidden=16, rgcn_layers=2, flow_layers=2, st_hidden=(16,)).eval()


def nitrogen_fraction(g):
    f = float((g.types == 1).mean())
    return f, f, str(g.types.tolist())


def test_step_log_likelihoods_add_up_to_the_teacher_forced_likelihood():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    graphs = model.generate(16, temperature=1.0)
    b = graphs_to_batch(graphs, model.max_atoms, model.num_types, stop_type=2)
    ll = model.log_likelihood(b["x"], b["adj"], b["num_atoms"], center=True)
    st = model.step_log_likelihoods(b["x"], b["adj"], b["num_atoms"])
    plan = model.plan(b["x"].shape[1])
    taken = st["edge"].gather(2, b["adj"][:, plan.ei, plan.ej].unsqueeze(-1)).squeeze(2) * st["edge_mask"]
    torch.testing.assert_close(st["node"].sum(1) + taken.sum(1), ll["node"] + ll["edge"])


def test_record_reports_refused_bonds_and_the_stop_type():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    torch.manual_seed(1)
    plain = model.generate(32, temperature=1.0)
    torch.manual_seed(1)
    record = {}
    graphs = model.generate(32, temperature=1.0, record=record)
    assert [g.types.tolist() for g in plain] == [g.types.tolist() for g in graphs]  # same draws with or without
    assert record["rejected"].shape == (32, 9, 12, 3) and record["rejected"].sum() > 0
    for g, s in zip(graphs, record["stop_type"].tolist()):
        assert (s == -1) == (g.num_atoms == 9) and s < 4


def policy(model: GraphAF, lr: float = 1e-3, **kw) -> PolicyModule:
    from functools import partial

    module = PolicyModule(model, property="qed", optimizer=partial(torch.optim.Adam, lr=lr), temperature=1.0, **kw)
    module.reward_fn = nitrogen_fraction
    return module


@pytest.mark.parametrize("baseline", ["none", "moving"])
def test_first_step_ppo_gradient_is_the_reinforce_gradient(baseline):
    model = tiny_model()
    opt = policy(model, baseline=baseline)
    torch.manual_seed(0)
    ro = opt.rollout(32)
    loss, stats = opt.policy_loss(ro)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clipped"] == 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    g_ppo = torch.autograd.grad(loss, params, allow_unused=True)
    act = opt.actions(ro)
    # no baseline (DIG): the advantage is the reward; moving: minus this batch's mean reward per atom index
    adv = act["reward"] - (opt.baseline[act["atom"]] if baseline == "moving" else 0.0)
    reinforce = -(act["weight"] * adv * act["lp_new"]).sum() / act["weight"].sum()
    g_ref = torch.autograd.grad(reinforce, params, allow_unused=True)
    n = 0
    for a, b in zip(g_ppo, g_ref):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        n += int(a.abs().sum() > 0)
    assert n > 5  # the gradient reaches the R-GCN and both flows


def test_the_stop_atom_is_no_action():
    """DIG drops the final unconnected atom's node and edge steps: the actions are the molecule's own steps only."""
    model = tiny_model()
    opt = policy(model)
    torch.manual_seed(0)
    ro = opt.rollout(32)
    ro.rejected.zero_()  # count the taken actions only
    act = opt.actions(ro)
    n = ro.num_atoms.tolist()
    want = sum(k for k in n) + sum(min(i, model.window) for k in n for i in range(1, k))
    assert len(act["weight"]) == want
    assert any(k < model.max_atoms for k in n)  # some molecules did stop before max_atoms


def test_fine_tuning_raises_the_mean_reward_of_samples():
    model = tiny_model()

    def mean_reward() -> float:
        torch.manual_seed(123)
        return float(np.mean([nitrogen_fraction(g)[0] for g in model.generate(400, temperature=1.0)]))

    before = mean_reward()
    module = policy(model, lr=1e-2, rollout_size=64, baseline="moving")
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, datamodule=RolloutData(25))
    assert trainer.global_step == 25 and len(module.history) == 25
    after = mean_reward()
    # measured 0.23 -> 0.60 (a quarter of the atoms are N at random)
    assert after > before + 0.15, (before, after)


def test_property_reward_and_top_k():
    model = tiny_model()
    r = PropertyReward(model.vocab, "qed")
    graphs = model.generate(8, temperature=1.0)
    for reward, score, smi in map(r, graphs):
        assert smi is not None and 0.0 <= score <= 1.0 and reward == pytest.approx(2.0 + 2.0 * score)
    assert PropertyReward(model.vocab, "plogp").reward_type == "exp"
    with pytest.raises(ValueError, match="property: unknown property 'logp'"):
        PropertyReward(model.vocab, "logp")
    top = top_k(["CC", "CCO", None, "CC", "N"], [0.1, 0.5, None, 0.1, 0.3], 3)
    assert [t["smiles"] for t in top] == ["CCO", "N", "CC"]


@pytest.fixture(scope="module")
def untrained_ckpt(tmp_path_factory):
    """A flowsuite checkpoint of a tiny QM9 GraphAF, as train writes it (the weights need no training here)."""
    path = tmp_path_factory.mktemp("graphaf_ckpt") / "last.ckpt"
    cfg = compose("graphaf", "train", [f"output_dir={path.parent}", "logger=none", *TINY])
    module = build_module(cfg)
    save_checkpoint(module, path, 0)
    return path


def test_optimize_command_writes_top3_and_a_checkpoint_sample_loads(untrained_ckpt, tmp_path):
    out = tmp_path / "opt"
    proc = run_cli("graphaf", "optimize", f"ckpt={untrained_ckpt}", "property=qed", "steps=3", "batch_size=16",
                   "eval_n=24", "lr=1e-3", "callbacks.step_checkpoint.every_n_train_steps=2", "max_atoms=12",
                   f"hydra.run.dir={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["property"] == "qed" and len(m["history"]) == 3 and m["steps"] == 3 and m["max_atoms"] == 12
    assert (out / "metrics.csv").is_file() or list(out.rglob("metrics.csv"))  # logged through Lightning's logger
    for key in ("before", "after"):
        assert 0.0 < m[key]["mean"] <= 1.0 and len(m[key]["top3"]) == 3
        scores = [t["score"] for t in m[key]["top3"]]
        assert scores == sorted(scores, reverse=True) and len({t["smiles"] for t in m[key]["top3"]}) == 3
    assert len(m["top3_during_training"]) == 3 and "top-3 qed" in proc.stdout
    restored = restore(out / "checkpoints" / "last.ckpt")
    assert restored.global_step == 3 and restored.cfg.command == "optimize" and restored.cfg.model.max_atoms == 12
    module = restored.module
    original = restore(untrained_ckpt).module
    new_w, old_w = module.model.state_dict(), original.model.state_dict()
    changed = [not torch.equal(new_w[k], old_w[k]) for k in old_w]
    assert any(changed)  # the fine-tuned weights were saved
    from apps.graphaf.commands import sample  # the sample command takes the run directory, in-process (faster)

    sample(compose("graphaf", "sample", [f"ckpt={out}", "n=8", "logger=none", f"output_dir={tmp_path / 's'}"]))
    assert len((tmp_path / "s" / "samples.smi").read_text().splitlines()) == 8


def test_optimize_resumes_from_its_run_dir(untrained_ckpt, tmp_path):
    from apps.graphaf.commands import optimize

    common = [f"ckpt={untrained_ckpt}", "property=qed", "batch_size=4", "eval_n=4", "logger=none", "max_atoms=9",
              "trainer.enable_progress_bar=false", "callbacks.step_checkpoint.every_n_train_steps=1"]  # fmt: skip
    optimize(compose("graphaf", "optimize", [*common, "steps=2", f"output_dir={tmp_path / 'a'}"]))
    m = optimize(compose("graphaf", "optimize", [*common, "steps=4", f"ckpt_path={tmp_path / 'a'}",
                                                 f"output_dir={tmp_path / 'b'}"]))  # fmt: skip
    assert m["steps"] == 4 and len(m["history"]) == 2  # iterations 3 and 4 only: 1 and 2 came from the checkpoint
    assert restore(tmp_path / "b").global_step == 4


@pytest.mark.parametrize(
    "args,message",
    [(["property=logp", "ckpt=x.ckpt"], "property: unknown property 'logp'"), (["property=qed"], "ckpt"),
     (["property=qed", "ckpt=/nonexistent.ckpt"], "ckpt: checkpoint file /nonexistent.ckpt does not exist")],
)  # fmt: skip
def test_bad_input_names_the_key(args, message, tmp_path):
    from apps.graphaf.commands import optimize

    with pytest.raises(Exception, match=message):
        optimize(compose("graphaf", "optimize", [*args, f"output_dir={tmp_path}"]))
