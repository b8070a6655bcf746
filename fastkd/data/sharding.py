"""Which samples each rank reads, in which order: one definition shared by every backend.

Training: the whole list is permuted by a generator seeded with (seed, epoch) only, so every
rank computes the same permutation without talking to the others; the permutation is cut to
``world_size * steps * batch_size`` samples and rank ``r`` takes the ``r``-th contiguous block.
Shards are therefore disjoint, every rank gets the same number of full batches (fixed batch
shape, no rank waits for another at the end of an epoch), and at most
``world_size * batch_size - 1`` samples sit out an epoch (different ones each epoch).

``max_batches`` (``train.max_steps_per_epoch``) keeps the first batches of each rank's block, so a
loader serves exactly the batches the trainer takes and every pass ends cleanly.

Augmentation draws its randomness from per-sample seeds that depend on (seed, epoch, position in
the epoch's permutation) only: `train_sample_seeds` seeds the torch backend's transforms, and
`sample_uniforms` turns the same seeds into the DALI backend's crop windows and flips. A sample's
crop therefore never depends on the worker count, on pipeline rebuilds or on where a run resumed.

Validation: rank ``r`` takes the contiguous block ``[N*r//W, N*(r+1)//W)`` of the file list
(DALI's own shard formula), so the blocks tile the list exactly: every image is evaluated once
and no rank pads with duplicates. Block sizes differ by at most one; the last batch of a rank
may be smaller than the batch size.
"""

from __future__ import annotations

import numpy as np

from fastkd.errors import DataError


def train_steps(num_samples: int, *, batch_size: int, world_size: int) -> int:
    """Full batches per rank and epoch; raises `DataError` when there is not even one."""
    steps = (num_samples // world_size) // batch_size
    if steps == 0:
        raise DataError(
            f"the training split has {num_samples} images, fewer than one batch per process "
            f"(data.batch_size={batch_size} x {world_size} process(es)): lower data.batch_size "
            "or add images"
        )
    return steps


def train_shard(
    num_samples: int, *, batch_size: int, rank: int, world_size: int, seed: int, epoch: int
) -> np.ndarray:
    """Positions in the file list that ``rank`` reads in ``epoch``, in reading order."""
    _check_rank(rank, world_size)
    per_rank = train_steps(num_samples, batch_size=batch_size, world_size=world_size) * batch_size
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    return order[rank * per_rank : (rank + 1) * per_rank]


def train_sample_seeds(
    num_samples: int, *, batch_size: int, rank: int, world_size: int, seed: int, epoch: int
) -> np.ndarray:
    """One augmentation seed per sample of `train_shard` (same length and order).

    The seeds depend on (seed, epoch, global position) only, so a sample's crop and flip do not
    change with the number of loader workers or with which worker happens to decode it.
    """
    _check_rank(rank, world_size)
    per_rank = train_steps(num_samples, batch_size=batch_size, world_size=world_size) * batch_size
    seeds = np.random.default_rng([seed, epoch, 1]).integers(
        0, 2**63 - 1, size=per_rank * world_size, dtype=np.int64
    )
    return seeds[rank * per_rank : (rank + 1) * per_rank]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def sample_uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniform floats in [0, 1) per seed (shape ``len(seeds) x count``, float32).

    A counter-based generator (splitmix64 of seed and counter), vectorized over the batch: the
    numbers of a sample are a pure function of its seed, whatever else is in its batch.
    """
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        state = seeds.astype(np.uint64)[:, None] + _GOLDEN * np.arange(
            1, count + 1, dtype=np.uint64
        )
        state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        state ^= state >> np.uint64(31)
    # The top 24 bits: exactly representable in float32, so 1.0 is never reached.
    return (state >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


def val_shard(num_samples: int, *, rank: int, world_size: int) -> np.ndarray:
    """Positions in the file list that ``rank`` evaluates (a contiguous block, no padding)."""
    _check_rank(rank, world_size)
    start = num_samples * rank // world_size
    stop = num_samples * (rank + 1) // world_size
    return np.arange(start, stop)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


class ShardPlan:
    """The samples one rank reads from one split, epoch by epoch (shared by both backends)."""

    def __init__(
        self,
        num_samples: int,
        *,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        max_batches: int = 0,
    ) -> None:
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batches < 0:
            raise ValueError(f"max_batches must be >= 0 (0 = no cap), got {max_batches}")
        self.num_total = num_samples
        self.train = train
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        if train:
            steps = train_steps(num_samples, batch_size=batch_size, world_size=world_size)
            if max_batches:
                steps = min(steps, max_batches)
            self.num_samples = steps * batch_size
            self.num_batches = steps
        else:
            self.num_samples = len(val_shard(num_samples, rank=rank, world_size=world_size))
            self.num_batches = -(-self.num_samples // batch_size)

    def _kwargs(self, epoch: int) -> dict[str, int]:
        return dict(
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
        )

    def indices(self, epoch: int) -> np.ndarray:
        """Positions in the file list this rank reads in ``epoch``, in order."""
        if self.train:
            return train_shard(self.num_total, **self._kwargs(epoch))[: self.num_samples]
        return val_shard(self.num_total, rank=self.rank, world_size=self.world_size)

    def sample_seeds(self, epoch: int) -> np.ndarray:
        """Per-sample augmentation seeds aligned with `indices` (zeros for validation)."""
        if self.train:
            return train_sample_seeds(self.num_total, **self._kwargs(epoch))[: self.num_samples]
        return np.zeros(self.num_samples, dtype=np.int64)

    def _cut(self, values: np.ndarray) -> list[np.ndarray]:
        return [
            values[start : start + self.batch_size]
            for start in range(0, len(values), self.batch_size)
        ]

    def batches(self, epoch: int) -> list[np.ndarray]:
        """`indices` cut into batches (all full for training; the last may be short for val)."""
        return self._cut(self.indices(epoch))

    def seed_batches(self, epoch: int) -> list[np.ndarray]:
        """`sample_seeds` cut into batches, aligned with `batches`."""
        return self._cut(self.sample_seeds(epoch))
