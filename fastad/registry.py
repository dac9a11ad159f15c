"""The model families: one entry each. api, CLI, training, evaluation and export iterate over
this registry and never name a model.

A family is its own module (config dataclass, model, losses, scoring and its training `Task`)
plus one `Family` entry here. Adding a family = one module + one `register(Family(...))`;
tests register throwaway families the same way.

Contract for a family's model class: `Model(cfg, backbone, impl="reference")` where `backbone`
is the frozen `fastad.backbones.FeatureExtractor` stored in the run (the model keeps it as
`model.backbone`) and `impl` one of `fastad.ops.IMPLS`; `model.cfg` has `resize` and `crop`;
`forward(images (B, 3, crop, crop) float in [0, 1]) -> (anomaly_map (B, crop, crop), score (B,))`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import FastADError
from .models import adtr, fod, utad
from .training.task import Option, Task


@dataclass(frozen=True)
class Family:
    name: str                     # the "model" key of a run's config.json and `--model` value
    title: str                    # one line for help texts
    config: type                  # JSONConfig dataclass stored in config.json
    model: type                   # nn.Module, see the module docstring
    task: type[Task]              # its training
    options: tuple[Option, ...] = ()   # family-specific training options (CLI flags, train kwargs)
    # explain(model, images) -> {name: tensor}: the model's intermediates, for `eval --intermediates`
    explain: Callable | None = None

    def build(self, cfg, backbone, impl: str = "reference"):
        return self.model(cfg, backbone, impl=impl)


FAMILIES: dict[str, Family] = {}
DEFAULT = "fod"  # the flagship: what `fastad train` and `fastad demo` train unless told otherwise


def register(family: Family) -> Family:
    """Add (or replace) a family; -> it."""
    FAMILIES[family.name] = family
    return family


def get(name, what: str = "model") -> Family:
    """The family called `name`, or one FastADError line listing the known ones."""
    if not isinstance(name, str) or name not in FAMILIES:  # a config.json may hold any JSON value
        raise FastADError(f"{what} {name!r} is not a known model family (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


register(Family("fod", "FOD, Focus the Discrepancy (ICCV 2023): I2Correlation transformers per feature level",
                fod.FODConfig, fod.FOD, fod.FODTask, fod.TRAIN_OPTIONS))
register(Family("adtr", "ADTR: transformer feature reconstruction (ADTR+ with labelled or synthetic anomalies)",
                adtr.ADTRConfig, adtr.ADTR, adtr.ADTRTask, adtr.TRAIN_OPTIONS))
register(Family("utad", "UTAD: two-stage impression + expert reconstruction, perceptual measurement",
                utad.UTADConfig, utad.UTAD, utad.UTADTask, utad.TRAIN_OPTIONS, explain=utad.UTAD.explain))
