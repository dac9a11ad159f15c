"""What a model family gives the training loop: a `Task` with its `Stage`s, and its `Option`s.

The loop (fastad.training.loop) owns everything every family shares: run-directory checks,
config resolution and resume rules, seeding, shuffling, progress bars, finite-loss checks,
history, checkpoints for any number of stages and optimisers, atomic run writing. A task owns
what differs: the backbone it needs, what it caches before the first step, its stages (each an
optimiser and a `step` that returns its losses after `backward()`), and its normal-score pass.

This module imports nothing from the families or the loop, so a family module can subclass
`Task` without an import cycle.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import FastADError


@dataclass(frozen=True)
class Option:
    """A family-specific training option: a keyword of `fastad.train` and a `fastad train` flag.

    `dest` is the keyword (and argparse dest); `flag` the CLI flag (None: Python API only);
    `kwargs` go to argparse's add_argument (help, choices, type, action, ...). An option left
    at None was not given.
    """
    dest: str
    flag: str | None
    kwargs: dict = field(default_factory=dict)


@dataclass
class Stage:
    """One optimisation stage: `epochs` passes over `num_samples` items in shuffled batches.

    step(idx, generator, step_index) runs forward and backward on the batch of sample indices
    `idx` and returns its loss values as floats; the loop checks them, steps `optimizer` and
    clears the gradients. `generator` is the epoch's shuffling generator (seeded from the seed,
    the epoch and `seed_offset`), for any extra randomness the step needs, so a resumed run
    draws the same numbers. `lr_at(global_step)` sets the learning rate before each step.
    `begin` runs before the stage's epochs (even when none are left, e.g. on resume), `end`
    after them, `epoch_begin(generator)` at the start of every epoch.
    """
    name: str
    epochs: int
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Tensor, torch.Generator, int], dict[str, float]]
    num_samples: int
    batch_size: int
    seed_offset: int = 0
    lr_at: Callable[[int], float] | None = None
    begin: Callable[[], None] | None = None
    end: Callable[[], None] | None = None
    epoch_begin: Callable[[torch.Generator], None] | None = None

    @property
    def steps_per_epoch(self) -> int:
        # the ragged last batch is dropped: static shapes, equal weights per step
        return self.num_samples // min(self.batch_size, self.num_samples)


class Task:
    """One family's training. Subclasses set `config_class` and override the hooks they need.

    The loop calls, in order: `config_overrides`, `default_config`, `check_config`, `check_data`,
    `threads`, `backbone`, (the family's model is built), `prepare`, `stages`, after a resume
    `resumed`, the stages, `finish`, `image_scores`; `checkpoint_state` with every checkpoint.
    """

    config_class: type
    epoch_fields: tuple[str, ...] = ("epochs",)  # config fields a resume may change

    def __init__(self, options: dict[str, Any], resume: bool = False):
        self.options = options
        self.resume = resume

    # -- configuration -------------------------------------------------------------------------
    def config_overrides(self) -> dict[str, Any]:
        """Config fields set by the options (None = not given). Default: same-named fields."""
        fields = self.config_class.__dataclass_fields__
        return {k: v for k, v in self.options.items() if k in fields}

    def default_config(self):
        return self.config_class()

    def check_config(self, cfg) -> None:
        """Raise FastADError for a config the family cannot train (default: the schedule of a
        config with `epochs`, `batch_size` and `lr`). 0 epochs is the untrained starting point."""
        if cfg.epochs < 0 or cfg.batch_size < 1 or not cfg.lr > 0:
            raise FastADError(f"epochs must be >= 0, batch size >= 1 and lr > 0 "
                              f"(got {cfg.epochs}, {cfg.batch_size}, {cfg.lr})")

    def check_data(self, samples: list) -> None:
        """Raise FastADError for training data the family cannot use."""

    def threads(self, device: torch.device):
        """A context for the whole training (e.g. a CPU thread limit)."""
        return contextlib.nullcontext()

    # -- model and data ------------------------------------------------------------------------
    def backbone(self, cfg, saved_run: dict | None):
        """The frozen feature network the model is built with (a FeatureExtractor)."""
        raise NotImplementedError

    def prepare(self, model, samples: list, device: torch.device, progress: bool) -> dict:
        """Cache what stays fixed during training (e.g. backbone features); -> training-record
        entries (counts, seconds)."""
        return {}

    def stages(self, model, device: torch.device) -> list[Stage]:
        raise NotImplementedError

    def resumed(self, record: dict) -> None:
        """After a checkpoint was loaded (model and optimisers): refresh derived state."""

    def checkpoint_state(self) -> dict:
        """Extra JSON entries stored with every checkpoint (read back in `resumed`)."""
        return {}

    def finish(self) -> dict:
        """After the last stage: fit what is fitted after training; -> training-record entries."""
        return {}

    def image_scores(self, max_images: int = 64):
        """Image scores of up to `max_images` training images (the run's `normal_scores`)."""
        raise NotImplementedError
