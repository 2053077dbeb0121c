"""A seeded training order that a checkpoint can stop and resume mid-epoch.

- :class:`ResumableSampler`: the order and a read cursor in it.
- :class:`ResumableDataLoader`: a ``DataLoader`` with ``state_dict`` / ``load_state_dict``, which Lightning
  stores in its checkpoints (the fit loop's state) and restores before it iterates the loader again.

Epoch ``e`` visits the indices in the order ``torch.randperm(n)`` drawn from a generator seeded with
``seed + e``; with ``R`` ranks, rank ``r`` takes every ``R``-th index of that order (the tail is dropped so that
every rank gets ``n // R``). The order is a function of ``(seed, epoch)`` alone, so the state is two integers:
the epoch and the position in it (indices of the epoch done on this rank).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class SamplerStateError(ValueError):
    """A saved sampler state that does not fit this sampler; the message says what differs and what to do."""


class ResumableSampler(DistributedSampler):
    """Seeded shuffle, a new permutation each epoch, resumable mid-epoch, sharded across ranks.

    ``len()`` is the whole epoch's count on this rank, also when resuming mid-epoch (the trainer counts the
    epoch's batches by it and skips the ones already trained on). ``set_epoch`` (called by Lightning at the
    start of every epoch) moves to another epoch's beginning; a finished epoch iterated again starts over.
    ``position`` is the read cursor (indices handed to the loader); a pass begins at ``start``. One pass at a
    time. ``state_dict`` / ``load_state_dict`` save and restore ``(epoch, position)``.

    Args:
        dataset: a sized data set of ``n`` samples.
        seed: the seed of every epoch's permutation (epoch ``e`` uses ``seed + e``).
        num_replicas, rank: the number of ranks sharing the data set and this one's index.
    """

    def __init__(self, dataset: Sized, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.position = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.position = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        if self.position >= self.num_samples:  # the epoch was finished: visit it again from its start
            self.position = 0
        self.start = self.position
        order = list(super().__iter__())
        for index in order[self.start :]:
            self.position += 1
            yield index

    def state_dict(self) -> dict[str, Any]:
        """``epoch`` and ``position`` (indices of the epoch handed out on this rank), with what they refer to."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "dataset_size": len(self.dataset),
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` stopped; refuse a state of another data set, seed or number of ranks."""
        mine = self.state_dict()
        differs = [
            f"{key} {state[key]} in the checkpoint, {mine[key]} now"
            for key in ("dataset_size", "seed", "num_replicas")
            if key in state and state[key] != mine[key]
        ]
        if differs:
            raise SamplerStateError(
                "cannot continue the checkpoint's training order: "
                + "; ".join(differs)
                + ". Resume with the data settings and number of devices of the checkpoint's run, or start a "
                "new run without ckpt_path."
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose state Lightning checkpoints.

    The position saved is that of the batches handed out (trained on), not the sampler's read cursor, which
    worker processes move ahead (``prefetch_factor * num_workers`` batches). Iteration begins at the first
    ``next()``, after Lightning's ``set_epoch``, so a resume from an epoch's end reads the next epoch. A loader
    Lightning rebuilt with another sampler (``overfit_batches``) has no state to keep.
    """

    _handed_out: tuple[int, int] | None = None  # (epoch, position) after the last batch handed out

    def __iter__(self) -> Iterator[Any]:
        return self._counted_batches()

    def _counted_batches(self) -> Iterator[Any]:
        self._handed_out = None
        batches = super().__iter__()  # the sampler's pass begins here (workers) or at its first next()
        sampler = self.sampler
        counted = isinstance(sampler, ResumableSampler) and self.batch_size is not None
        for count, batch in enumerate(batches, start=1):
            if counted:
                self._handed_out = (sampler.epoch, sampler.start + count * self.batch_size)
            yield batch
        if counted:  # the pass is over: everything read was handed out (a partial last batch is dropped)
            self._handed_out = (sampler.epoch, sampler.position)

    def state_dict(self) -> dict[str, Any]:
        if not isinstance(self.sampler, ResumableSampler):
            return {}
        state = self.sampler.state_dict()
        if self._handed_out is not None and self._handed_out[0] == state["epoch"]:
            state["position"] = self._handed_out[1]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and isinstance(self.sampler, ResumableSampler):
            self.sampler.load_state_dict(state)
            self._handed_out = None
