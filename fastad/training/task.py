"""What a model family gives the training loop: a `Task` with its `Stage`s, and its `Option`s.

The loop (fastad.training.loop) owns everything every family shares: run-directory checks,
config resolution and resume rules, seeding, shuffling, progress bars, finite-loss checks,
history, checkpoints for any number of stages and optimisers, atomic run writing. A task owns
what differs: the backbone it needs, what it caches before the first step, its stages (each an
optimiser and a `step` that returns the loss to backpropagate and its values), and its
normal-score pass. Data-parallel training needs nothing more from a task: the loop splits the
batches and syncs the gradients; `map_batches` spreads a task's per-image caching over the ranks.

This module imports nothing from the families or the loop, so a family module can subclass
`Task` without an import cycle.
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import FastADError
from .distributed import Parallel


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


def int_at_least(minimum: int, kind: str):
    """An argparse type: an integer >= `minimum`, else "expected a {kind} integer"."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
        return value
    return parse


@dataclass
class Stage:
    """One optimisation stage: `epochs` passes over `num_samples` items in shuffled batches.

    step(idx, generator, step_index) runs the forward pass on the batch of sample indices `idx`
    and returns (loss, values): the scalar tensor to backpropagate and its parts as floats; the
    loop calls `loss.backward()`, checks the values, steps `optimizer` and clears the gradients.
    The loss must be a mean over the batch's samples: with N processes each step gets 1/N of the
    batch and the gradients are averaged. `generator` is the epoch's shuffling generator (seeded from the seed,
    the epoch and `seed_offset`), for any extra randomness the step needs, so a resumed run
    draws the same numbers. `lr_at(global_step)` sets the learning rate before each step.
    `begin` runs before the stage's epochs (even when none are left, e.g. on resume), `end`
    after them, `epoch_begin(generator)` at the start of every epoch. `extra_optimizers` are
    optimisers the step updates itself (e.g. a GAN's discriminator, stepped between its own
    forward and the generator's): the loop only checkpoints and restores them. With
    `steps_itself` the step function backpropagates, steps and clears the main optimiser itself
    (an update schedule the loop's one step per batch cannot express) and returns
    (None, values); the loop then only checks the values. Such a stage does not run data-parallel.
    """
    name: str
    epochs: int
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Tensor, torch.Generator, int], tuple[torch.Tensor, dict[str, float]]]
    num_samples: int
    batch_size: int
    seed_offset: int = 0
    lr_at: Callable[[int], float] | None = None
    begin: Callable[[], None] | None = None
    end: Callable[[], None] | None = None
    epoch_begin: Callable[[torch.Generator], None] | None = None
    steps_itself: bool = False
    extra_optimizers: tuple[torch.optim.Optimizer, ...] = ()

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
        self.parallel = Parallel()  # this process's rank (set by the loop)

    def map_batches(self, fn: Callable[[int, int, int], Any], num_items: int, batch_size: int) -> list:
        """[fn(batch_index, start, stop) for each batch of range(num_items)], in order; with
        several processes each computes its share of the batches and every one gets all results
        (CPU tensors or tuples/lists of them). For caching per-image features in `prepare`."""
        return self.parallel.map_batches(fn, num_items, batch_size)

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

    def image_scores(self, indices: list[int]):
        """Image scores (a 1-D array) of the training images at `indices` (the run's
        `normal_scores`; with several processes each scores a part)."""
        raise NotImplementedError
