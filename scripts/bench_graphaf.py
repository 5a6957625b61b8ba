"""GraphAF benchmark: training molecules/s and sampling molecules/s (batch 1, 64, 512), CPU and GPU when present.

    python -m scripts.bench_graphaf                         # QM9- and ZINC-sized settings, untrained models
    python -m scripts.bench_graphaf --ckpt outputs/graphaf/train/<run>   # sample with a trained QM9 model too

Training rows: one optimizer step (teacher-forced NLL forward + backward + Adam) on real molecules (built-in QM9;
ZINC250k rows from tests/apps/graphaf/zinc250k_sample.csv) in random BFS order. Sampling rows: ``generate`` with
the valency check; an untrained model stops early (small molecules), so the mean atom count is printed beside the
rate, and a trained checkpoint gives the realistic QM9 number.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from apps.graphaf.data import DEFAULT_DATA, MoleculeDataset, graphs_to_batch, preprocess  # noqa: E402
from apps.graphaf.model import GraphAF  # noqa: E402
from core.benchmark import sync

ZINC = Path(__file__).resolve().parents[1] / "tests" / "apps" / "graphaf" / "zinc250k_sample.csv"
MODELS = {
    "small": dict(hidden=64, rgcn_layers=3, flow_layers=4, st_hidden=(64,)),  # conf/graphaf/model/graphaf.yaml
    "paper": dict(hidden=128, rgcn_layers=3, flow_layers=12, st_hidden=(128,)),  # experiment=paper
}


def dataset(name: str) -> tuple[MoleculeDataset, list[str], int]:
    if name == "qm9":
        d = preprocess(DEFAULT_DATA, atoms=["C", "N", "O", "F"], max_atoms=9, max_molecules=2000, progress=False)
    else:
        d = preprocess(ZINC, atoms="auto", max_atoms=38, valence={"P": 5}, progress=False)
    return MoleculeDataset(d, range(len(d)), 12, random_order=True), d.atoms, d.max_atoms


def bench_train(model: GraphAF, ds: MoleculeDataset, batch: int, device: str, repeats: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    times = []
    for r in range(repeats + 1):  # the first step warms up
        graphs = [ds[(r * batch + k) % len(ds)] for k in range(batch)]
        b = {k: v.to(device) for k, v in graphs_to_batch(graphs, model.max_atoms, model.num_types).items()}
        sync(device)
        t0 = time.perf_counter()
        ll = model.log_likelihood(b["x"], b["adj"], b["num_atoms"])
        loss = -(ll["node"] + ll["edge"]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return batch / sorted(times[1:])[len(times[1:]) // 2]


@torch.no_grad()
def bench_sample(model: GraphAF, batch: int, device: str, total: int) -> tuple[float, float]:
    model.eval()
    model.generate(min(batch, 4))
    sync(device)
    t0, atoms, n = time.perf_counter(), 0, 0
    while n < total:
        gs = model.generate(batch, temperature=0.75)
        atoms += sum(g.num_atoms for g in gs)
        n += batch
    sync(device)
    return n / (time.perf_counter() - t0), atoms / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", nargs="*", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--ckpt", default=None, help="a trained GraphAF checkpoint (or run dir) to sample from as well")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sample-total", type=int, default=512, help="molecules per sampling row (at least one batch)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    settings = [("qm9", "small", 64), ("qm9", "paper", 32), ("zinc", "paper", 32)]
    for device in args.devices:
        for data, size, batch in settings:
            ds, atoms, max_atoms = dataset(data)
            torch.manual_seed(0)
            model = GraphAF(atoms, max_atoms, **MODELS[size]).to(device)
            train_rate = bench_train(model, ds, batch, device, args.repeats)
            rows.append((device, f"{data}/{size}", f"train b={batch}", f"{train_rate:.1f}", ""))
            for sb in (1, 64, 512):
                rate, atoms_per = bench_sample(model, sb, device, max(sb, args.sample_total if sb > 1 else 16))
                rows.append((device, f"{data}/{size} untrained", f"sample b={sb}", f"{rate:.1f}", f"{atoms_per:.1f}"))
        if args.ckpt:
            from core.training import restore

            module = restore(args.ckpt, app="graphaf", map_location=device).module
            model = module.eval_model
            for sb in (1, 64, 512):
                rate, atoms_per = bench_sample(model, sb, device, max(sb, args.sample_total if sb > 1 else 16))
                rows.append((device, "trained ckpt", f"sample b={sb}", f"{rate:.1f}", f"{atoms_per:.1f}"))
    head = ("device", "setting", "what", "molecules/s", "atoms/mol")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print(f"torch threads: {torch.get_num_threads()}")
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
