"""GraphAF benchmark: training molecules/s (dense vs sparse teacher forcing) and sampling molecules/s.

    python -m scripts.bench_graphaf                                  # ZINC and QM9 at paper settings, CPU (+ GPU)
    python -m scripts.bench_graphaf --quick --json bench.json        # toy sizes, a few seconds
    python -m scripts.bench_graphaf --ckpt data/pretrained/graphaf-qm9   # sample with a trained QM9 model too

Training rows: one optimizer step (teacher-forced NLL forward + backward + Adam) on real molecules in random BFS
order: ZINC250k rows (tests/apps/graphaf/zinc250k_sample.csv, up to 38 atoms, 9 element types as the paper) and the
built-in QM9, with the paper's model (R-GCN 3 x 128, 12 flow layers, batch 32). ``dense`` runs the R-GCN on every
edge step padded to the batch's width (B x S graphs of L atoms); ``sparse`` (the default) only on the atoms and bonds
each step of each molecule has. The two are timed alternately, ``--rounds`` times, and the median is reported: on a
shared machine single timings are noisy. Sampling rows: ``generate`` with the valency check at batch 1, 64 and 512
(target: at least 1,800 molecules/s at batch 512 on CPU for QM9); an untrained model stops early, so the mean atom
count is printed beside the rate, and ``--ckpt`` adds a trained model's realistic number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from apps.graphaf.data import DEFAULT_DATA, MoleculeDataset, graphs_to_batch, preprocess
from apps.graphaf.model import GraphAF
from core.benchmark import sync
from core.paths import REPO_ROOT

ZINC = REPO_ROOT / "tests" / "apps" / "graphaf" / "zinc250k_sample.csv"
PAPER = dict(hidden=128, rgcn_layers=3, flow_layers=12, st_hidden=(128,))  # experiment=paper
TOY = dict(hidden=16, rgcn_layers=2, flow_layers=2, st_hidden=(16,))


def dataset(name: str, quick: bool) -> MoleculeDataset:
    if name == "qm9":
        d = preprocess(DEFAULT_DATA, atoms=["C", "N", "O", "F"], max_atoms=9, max_molecules=2000, progress=False)
    else:  # the paper's vocabulary: elements, charges dropped (experiment=paper)
        d = preprocess(ZINC, atoms="auto", max_atoms=38, valence={"P": 5}, drop_charges=True, progress=False)
    n = min(len(d), 64 if quick else len(d))
    return MoleculeDataset(d, range(n), 12, random_order=True)


def train_step_seconds(model: GraphAF, opt: torch.optim.Optimizer, ds: MoleculeDataset, batch: int, k: int) -> float:
    graphs = [ds[(k * batch + i) % len(ds)] for i in range(batch)]
    dev = model.max_valence.device
    b = {key: v.to(dev) for key, v in graphs_to_batch(graphs, model.max_atoms, model.num_types).items()}
    sync(dev)
    t0 = time.perf_counter()
    ll = model.log_likelihood(b["x"], b["adj"], b["num_atoms"])
    loss = -(ll["node"] + ll["edge"]).sum() / ll["latent_dims"].sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sync(dev)
    return time.perf_counter() - t0


def bench_train(model: GraphAF, ds: MoleculeDataset, batch: int, rounds: int) -> dict[str, float]:
    """Median molecules/s of each teacher-forcing scheme, timed alternately on the same batches."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for scheme in times:  # warm-up
        model.teacher_forcing = scheme
        train_step_seconds(model, opt, ds, batch, 0)
    for r in range(rounds):
        for scheme in times:
            model.teacher_forcing = scheme
            times[scheme].append(train_step_seconds(model, opt, ds, batch, r + 1))
    model.teacher_forcing = "sparse"
    return {scheme: batch / statistics.median(t) for scheme, t in times.items()}


@torch.no_grad()
def bench_sample(model: GraphAF, batch: int, total: int) -> tuple[float, float]:
    model.eval()
    dev = model.max_valence.device
    model.generate(min(batch, 4))
    sync(dev)
    t0, atoms, n = time.perf_counter(), 0, 0
    while n < total:
        gs = model.generate(batch, temperature=0.75)
        atoms += sum(g.num_atoms for g in gs)
        n += batch
    sync(dev)
    return n / (time.perf_counter() - t0), atoms / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CPU, and the GPU if any")
    p.add_argument("--quick", action="store_true", help="toy model and sizes (a few seconds on a CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as a JSON list of objects")
    p.add_argument("--ckpt", default=None, help="a trained GraphAF checkpoint (or run dir) to sample from as well")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed training steps per scheme")
    p.add_argument("--data", nargs="+", default=["zinc", "qm9"], choices=("zinc", "qm9"))
    p.add_argument("--sample-batches", type=int, nargs="+", default=[1, 64, 512])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    size = TOY if args.quick else PAPER
    rounds = 1 if args.quick else args.rounds
    batches = [1, 8] if args.quick else args.sample_batches
    rows: list[dict] = []
    head = ("device", "data", "what", "molecules/s", "atoms/mol")
    widths = (6, 5, 26, 12, 9)
    print(f"GraphAF benchmark ({'toy' if args.quick else 'paper'} model), torch threads: {torch.get_num_threads()}")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)), flush=True)

    def add(device: str, data: str, what: str, rate: float, atoms: float | None, n_rounds: int) -> None:
        rows.append(
            dict(device=device, data=data, what=what, molecules_per_s=rate, atoms_per_mol=atoms, rounds=n_rounds)
        )
        cells = (device, data, what, f"{rate:.1f}", "" if atoms is None else f"{atoms:.1f}")
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)), flush=True)  # row by row: long runs keep partials
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")

    for device in devices:
        for data in args.data:
            ds = dataset(data, args.quick)
            d = ds.data
            torch.manual_seed(0)
            model = GraphAF(d.atoms, d.max_atoms, **size).to(device)
            batch = 4 if args.quick else 32
            for scheme, rate in bench_train(model, ds, batch, rounds).items():
                add(device, data, f"train {scheme} b={batch}", rate, None, rounds)
            for sb in batches:
                rate, apm = bench_sample(model, sb, max(sb, 16 if sb == 1 else 2 * sb))
                add(device, data, f"sample b={sb} (untrained)", rate, apm, 1)
        if args.ckpt:
            from core.training import restore

            model = restore(args.ckpt, app="graphaf", map_location=device).module.eval_model
            for sb in batches:
                rate, apm = bench_sample(model, sb, max(sb, 16 if sb == 1 else 2 * sb))
                add(device, "ckpt", f"sample b={sb} (trained)", rate, apm, 1)


if __name__ == "__main__":
    main()
