"""The package's shape: no import cycles, and a model family is one module plus one registry entry.

The cycle test reads every module's imports with `ast` (module-level and function-level alike:
an import deferred into a function to dodge a cycle is still a cycle). The family test registers
a tiny family defined here and runs train -> eval -> export (ONNX) -> predict through the CLI
without any change to library code.
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastad import registry
from fastad.backbones import FeatureExtractor
from fastad.training.task import Option, Stage, Task
from fastad.utils import JSONConfig

from .test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
# installed name -> source folder (setup.py's package_dir)
PACKAGES = {"fastad": ROOT / "fastad", "fastad.kernels": ROOT / "kernels", "fastad.export": ROOT / "export"}


# --------------------------------------------------------------------------------------------
# Import cycles
# --------------------------------------------------------------------------------------------
def package_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if name.startswith("fastad.") and name.split(".")[1] in ("kernels", "export") and package == "fastad":
                continue  # not a source folder of the package
            modules[name] = path
    return modules


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules `name` imports anywhere in its file (relative imports resolved). `from X
    import y` imports the module X.y where there is one, else X when X defines y (a name found
    in neither, such as a compiled extension, is no module of ours)."""
    known = set(modules)
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (parent, node.module or "") if p)
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known
                       else module if module in known and a.name in top_level_names(modules[module]) else None
                       for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_package_has_no_import_cycles():
    modules = package_modules()
    assert {"fastad.registry", "fastad.run", "fastad.training.loop", "fastad.kernels"} <= set(modules)
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph["fastad.run"] >= {"fastad.registry"}  # the reader sees what it should
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_package_imports_nothing_from_bench():
    def is_bench(module: str) -> bool:
        return module.split(".")[0] == "bench" or module.startswith("fastad.bench.") or module == "fastad.bench"

    for name, path in package_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not is_bench(node.module), (name, node.module)
            if isinstance(node, ast.Import):
                assert not any(is_bench(a.name) for a in node.names), name


def test_no_model_names_outside_registry_and_family_modules():
    """Layers that serve every family (training loop, run directory, runtime, CLI, export) never
    name a family."""
    generic = ["fastad/" + f for f in ("training/loop.py", "training/task.py", "training/distributed.py", "run.py",
                                       "cli.py", "evaluate.py", "backends.py", "utils.py", "runtime.py", "preprocess.py", "postprocess.py",
                                       "benchmark.py", "sidecar.py", "ops.py", "layers.py")]
    generic += ["export/onnx.py", "export/tensorrt.py", "export/check.py", "kernels/feature_distance.py"]
    for rel in generic:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):  # docstrings may cite where a formula comes from; code may not
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                body[0] = ast.Pass()
        code = ast.unparse(tree).lower()  # comments are gone too
        for name in ("utad", "adtr", "fod"):
            assert name not in code, (rel, name)


# --------------------------------------------------------------------------------------------
# A fourth family, registered from outside the library
# --------------------------------------------------------------------------------------------
@dataclass
class TinyConfig(JSONConfig):
    backbone: str = "efficientnet_lite0"
    stride: int = 8
    hidden: int = 8
    resize: int = 64
    crop: int = 64
    epochs: int = 1
    batch_size: int = 4
    lr: float = 1e-2
    seed: int = 0


class TinyModel(nn.Module):
    """Backbone features -> 1×1 bottleneck autoencoder -> squared error map -> max."""

    def __init__(self, cfg: TinyConfig, backbone, impl: str = "reference"):
        super().__init__()
        self.cfg, self.backbone, self.impl = cfg, backbone, impl
        c = backbone.channels[0]
        self.net = nn.Sequential(nn.Conv2d(c, cfg.hidden, 1), nn.ReLU(), nn.Conv2d(cfg.hidden, c, 1))

    def error(self, feats: torch.Tensor) -> torch.Tensor:
        return ((feats - self.net(feats)) ** 2).mean(1)

    def forward(self, images):
        with torch.no_grad():
            feats = self.backbone(images)[0]
        amap = F.interpolate(self.error(feats)[:, None], size=images.shape[-2:], mode="bilinear")[:, 0]
        return amap, amap.flatten(1).amax(1)


class TinyTask(Task):
    config_class = TinyConfig

    def backbone(self, cfg, saved_run):
        return FeatureExtractor(cfg.backbone, (cfg.stride,), weights=self.options.get("weights") or "auto")

    def prepare(self, model, samples, device, progress):
        from fastad.preprocess import prepare_images

        self.model = model
        with torch.no_grad():
            self.feats = model.backbone(prepare_images([s.path for s in samples], 64, 64))[0]
        return {"num_cached": len(self.feats)}

    def stages(self, model, device):
        def step(idx, gen, _):
            loss = model.error(self.feats[idx]).mean()
            return loss, {"loss": loss.item()}

        opt = torch.optim.Adam(model.net.parameters(), lr=model.cfg.lr)
        return [Stage("train", model.cfg.epochs, opt, step, len(self.feats), model.cfg.batch_size)]

    @torch.no_grad()
    def image_scores(self, indices):
        return self.model.error(self.feats[indices]).flatten(1).amax(1).numpy()


@pytest.fixture
def tiny_family(monkeypatch):
    family = registry.Family("tiny", "a test family: 1×1 autoencoder on one backbone stage", TinyConfig,
                             TinyModel, TinyTask, (Option("hidden", "--tiny-hidden", dict(type=int)),))
    monkeypatch.setitem(registry.FAMILIES, "tiny", family)
    return family


def test_a_new_family_runs_through_the_cli(tiny_family, capsys, demo_data, tmp_path):
    run, onnx_file = tmp_path / "run", tmp_path / "tiny.onnx"
    code, out, err = run_cli(capsys, "train", "--model", "tiny", "--data", demo_data, "--out", run,
                             "--weights", "none", "--tiny-hidden", "4", "--epochs", "2", "--quiet")
    assert code == 0, err
    conf = json.loads((run / "config.json").read_text())
    assert conf["model"] == "tiny" and conf["config"]["hidden"] == 4 and conf["config"]["epochs"] == 2
    assert [h["epoch"] for h in conf["training"]["history"]] == [1, 2] and conf["training"]["num_cached"] == 8
    assert conf["normal_scores"]["num_images"] == 8

    code, out, err = run_cli(capsys, "eval", "--run", run, "--data", demo_data, "--report", tmp_path / "r.json",
                             "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["num_images"] > 0 and 0.0 <= report["image_auroc"] <= 1.0

    code, out, err = run_cli(capsys, "export", "--run", run, "--format", "onnx", "--out", onnx_file)
    assert code == 0, err
    assert json.loads(Path(str(onnx_file) + ".json").read_text())["model"] == "tiny"

    images = sorted(str(p) for p in (demo_data / "test").rglob("*.png") if "ground_truth" not in p.parts)
    scores = {}
    for source in (run, onnx_file):
        out_dir = tmp_path / f"pred_{Path(source).name}"
        code, out, err = run_cli(capsys, "predict", "--run", source, *images, "--out", out_dir, "--quiet")
        assert code == 0, err
        rows = json.loads((out_dir / "scores.json").read_text())["images"]
        scores[source] = np.array([r["score"] for r in rows])
    np.testing.assert_allclose(scores[onnx_file], scores[run], rtol=1e-4, atol=1e-6)

    # options of one family are refused for another, in one line
    code, _, err = run_cli(capsys, "train", "--model", "fod", "--data", demo_data, "--out", tmp_path / "x",
                           "--tiny-hidden", "4", "--quiet")
    assert code == 2 and "option of --model tiny" in err and not (tmp_path / "x").exists()
