"""One side of ``bench_pointflow.py --reference``: times one row for flowsuite or for the reference implementation
(stevenygd/PointFlow) in this fresh process and prints one ``RESULT {json}`` line.

    python scripts/bench_pointflow_worker.py '{"impl": "reference", "row": "small_step", "reference": "/path"}'

``impl``: ``flowsuite``, ``flowsuite-cold`` (flowsuite without warm-started step sizes) or ``reference``.

The reference is imported from its own checkout (``reference`` on ``sys.path``, never copied here) with whatever
torchdiffeq comes first on ``PYTHONPATH`` (the parent puts torchdiffeq 0.0.1 there, as the reference pins). Its model
is built from its own argument parser; ``nn.Module.cuda`` becomes a no-op so that it builds on a CPU. Both sides are
measured the same way from the outside: a forward pre-hook on every ODE function counts its calls (solver steps and
adjoint passes alike), split by CNF (point / latent) and phase (before / during ``Tensor.backward``); the peak
memory is this process's peak resident set size. Nothing from flowsuite is imported on the reference's side.
"""

from __future__ import annotations

import json
import resource
import sys
import time

ROWS = {
    # point CNF widths, latent CNF widths, zdim, batch, points
    "paper_step": dict(dims=(512, 512, 512), latent_dims=(256, 256), zdim=128, batch=16, points=2048),
    "small_step": dict(dims=(128, 128), latent_dims=(256, 256), zdim=64, batch=8, points=512),
    "sample": dict(dims=(512, 512, 512), latent_dims=(256, 256), zdim=128, batch=4, points=2048),
    "tiny_step": dict(dims=(16, 16), latent_dims=(16, 16), zdim=16, batch=2, points=64),  # tests
    "tiny_sample": dict(dims=(16, 16), latent_dims=(16, 16), zdim=16, batch=2, points=64),
}


class _Counter:
    """Calls of each ODE function, keyed ``<cnf>_<phase>``; ``phase`` flips to ``bwd`` inside ``Tensor.backward``."""

    def __init__(self) -> None:
        self.phase = "fwd"
        self.counts: dict[str, int] = {}

    def hook(self, module, name: str) -> None:
        def pre(_mod, _args):
            key = f"{name}_{self.phase}"
            self.counts[key] = self.counts.get(key, 0) + 1

        module.register_forward_pre_hook(pre)

    def wrap_backward(self, torch) -> None:
        original = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):
            self.phase = "bwd"
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self.phase = "fwd"

        torch.Tensor.backward = backward

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


def _flowsuite(cfg: dict, counter: _Counter, torch, warm_start: bool = True):
    """flowsuite's PointFlowModel at the reference's settings; returns (step, sample) callables. ``warm_start``:
    training solves start at the previous solve's step size (the default); False: torchdiffeq's initial step."""
    from apps.pointflow.model import PointFlowModel
    from core.flows import CNF

    model = PointFlowModel(
        zdim=cfg["zdim"], point_hidden=cfg["dims"], latent_hidden=cfg["latent_dims"], solver="dopri5",
        atol=1e-5, rtol=1e-5, adjoint=True, end_time=0.5, train_end_time=True, trace="hutchinson",
        noise="gaussian", batch_norm=True, warm_start=warm_start,
    )  # fmt: skip
    for part, name in ((model.point_flow, "point"), (model.latent, "latent")):
        for m in part.modules():
            if isinstance(m, CNF):
                counter.hook(m.func, name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))

    def step(x):
        opt.zero_grad()
        t = model.elbo_terms(x)
        loss = (t["recon"] + t["prior"] - t["entropy"]).mean()
        loss.backward()
        opt.step()

    def sample(n, points):
        return model.sample(n, points)[1]

    return model, step, sample


def _reference(cfg: dict, counter: _Counter, torch, path: str):
    """The reference's PointFlow built from its own parser (its defaults, the sizes of the row)."""
    sys.path.insert(0, path)
    torch.nn.Module.cuda = lambda self, *a, **k: self  # its builders call .cuda()
    from args import get_parser
    from models.networks import PointFlow
    from models.odefunc import ODEfunc

    argv = ["--dims", "-".join(map(str, cfg["dims"])), "--latent_dims", "-".join(map(str, cfg["latent_dims"]))]
    argv += ["--zdim", str(cfg["zdim"]), "--use_latent_flow"]
    args = get_parser().parse_args(argv)
    model = PointFlow(args)
    for part, name in ((model.point_cnf, "point"), (model.latent_cnf, "latent")):
        for m in part.modules():
            if isinstance(m, ODEfunc):
                counter.hook(m, name)
    opt = model.make_optimizer(args)
    settings = {k: getattr(args, k) for k in ("solver", "atol", "rtol", "use_adjoint", "batch_norm", "time_length",
                                              "train_T", "layer_type", "nonlinearity")}  # fmt: skip

    def step(x):
        model(x, opt, 0)  # zero_grad, forward, backward, optimizer step

    def sample(n, points):
        return model.sample(n, points)[1]

    return model, step, sample, settings


def run(spec: dict) -> dict:
    import torch

    threads = int(spec.get("threads", 2))
    torch.set_num_threads(threads)
    cfg = dict(ROWS[spec["row"]])
    counter = _Counter()
    counter.wrap_backward(torch)
    torch.manual_seed(int(spec.get("seed", 0)))
    settings: dict = {}
    if spec["impl"] == "reference":
        model, step, sample, settings = _reference(cfg, counter, torch, spec["reference"])
    else:
        model, step, sample = _flowsuite(cfg, counter, torch, warm_start=spec["impl"] != "flowsuite-cold")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["batch"], cfg["points"], 3, generator=g) * 0.5
    warmup, repeats = int(spec.get("warmup", 0)), int(spec.get("repeats", 1))
    times, nfes = [], []
    if spec["row"].endswith("step"):
        model.train()
        for i in range(warmup + repeats):
            counter.take()
            t0 = time.perf_counter()
            step(x)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
                nfes.append(counter.take())
    else:
        model.eval()
        n = int(spec.get("shapes", cfg["batch"]))
        with torch.no_grad():
            for i in range(warmup + repeats):
                counter.take()
                t0 = time.perf_counter()
                out = sample(n, cfg["points"])
                dt = time.perf_counter() - t0
                assert out.shape == (n, cfg["points"], 3) and torch.isfinite(out).all()
                if i >= warmup:
                    times.append(dt / n)  # seconds per shape
                    nfes.append(counter.take())
    from importlib.metadata import version

    import torchdiffeq

    return dict(
        impl=spec["impl"], row=spec["row"], times=times, nfe=nfes,
        peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, threads=torch.get_num_threads(),
        torchdiffeq=f"{version('torchdiffeq')} ({torchdiffeq.__file__.rsplit('/', 2)[0]})", settings=settings,
    )  # fmt: skip


if __name__ == "__main__":
    print("RESULT " + json.dumps(run(json.loads(sys.argv[1]))), flush=True)
