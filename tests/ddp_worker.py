"""Run by tests/test_distributed.py under torchrun (one process per rank): trains the jobs of a
JSON spec one after another with `fastad.train`, and logs which rank wrote run files.

    python -m torch.distributed.run --nproc-per-node 2 … tests/ddp_worker.py SPEC.json

spec: {"log": file, "jobs": [{"model", "data", "out", "config": {...}, "resume", "options", "sgd"}]}.
The first job's `train` starts the process group (as `torchrun -m fastad train` does); later jobs
use it again.
"""
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from fastad import registry
from fastad.training import loop


def _logged(fn, name: str, log: Path):
    def wrapper(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.environ['RANK']} {name} {Path(args[0]).name}\n")
        return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def sgd_instead_of_adam():
    """Plain SGD (same lr) wherever a family builds Adam or AdamW: its step is the averaged
    gradient itself, without Adam's division by sqrt(v) + eps, which turns rounding-level
    differences of near-zero gradients into lr-sized steps (docs/distributed.md)."""
    adam, adamw = torch.optim.Adam, torch.optim.AdamW
    torch.optim.Adam = torch.optim.AdamW = lambda params, lr, **_: torch.optim.SGD(params, lr=lr)
    try:
        yield
    finally:
        torch.optim.Adam, torch.optim.AdamW = adam, adamw


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    log = Path(spec["log"])
    loop.write_run = _logged(loop.write_run, "write_run", log)
    loop.save_checkpoint = _logged(loop.save_checkpoint, "save_checkpoint", log)
    for job in spec["jobs"]:
        cfg = registry.get(job["model"]).config.from_dict(job["config"])
        with sgd_instead_of_adam() if job.get("sgd") else contextlib.nullcontext():
            loop.train(job["data"], job["out"], model=job["model"], config=cfg, device="cpu", progress=False,
                       resume=job.get("resume", False), **job.get("options", {}))


if __name__ == "__main__":
    main(sys.argv[1])
