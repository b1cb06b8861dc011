"""`build_loader`: batches of (normalised float images, int64 labels) on the training device, with exact resume.

Two pipelines behind one interface:
- the cached uint8 tensor pipeline (`fast.py`) for small images (CIFAR, shapes, ImageFolder up to 64 px) with the
  `cifar` preset: augmentation a batch at a time on the device;
- a DataLoader with worker processes, pinned memory and persistent workers for large images (ImageNet-style
  folders, CUB), with per-sample torchvision transforms.

Both draw each epoch's order from (seed, epoch), shard training batches by rank (every rank gets the same number),
shard evaluation without padding duplicates (each sample seen exactly once across ranks), and resume exactly from
`state_dict()` (epoch and batches already handed out).

    >>> loader = build_loader("shapes", "train", preset="cifar", batch_size=128, train=True, device="cpu")
    >>> for epoch in range(3):
    ...     loader.set_epoch(epoch)
    ...     for images, labels in loader: ...
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from resnetkit.data import fast
from resnetkit.data.datasets import (
    CIFAR,
    CifarMosaic,
    CsvListing,
    ImageFolder,
    Shapes,
    ShapesMulti,
    SkippedSample,
    build_dataset,
    log,
    report_skipped,
    stratified_indices,
)
from resnetkit.data.image import BadImageError, parallel_decoders
from resnetkit.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SHAPES_MEAN,
    SHAPES_STD,
    RandomResizedCropPlan,
    build_transform,
    check_extras,
    check_preprocess,
    decode_min_size,
    fixed_head,
    normalize,
    preprocess_info,
)


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (seed, epoch, batch, ...), so nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class Loader:
    """Shared by both pipelines: the epoch plan (which indices go in which batch on this rank) and resume state."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        train: bool,
        seed: int,
        rank: int,
        world_size: int,
        classes: list[str],
        preprocess: dict,
        device: torch.device,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} ranks")
        self.num_samples, self.batch_size, self.train = num_samples, batch_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.classes, self.preprocess, self.device = classes, preprocess, device
        self.epoch, self.position = 0, 0
        self._plan_epoch, self._plan = None, None
        self.augmenting = train
        self.groups: list[torch.Tensor] | None = None  # class-balanced sampling: the indices of each group

    def balance(self, label_sets: Sequence[Sequence[int]]) -> None:
        """Class-balanced training order (data.sampler: balanced): each epoch still has num_samples draws, split
        equally between the classes (the remainder to classes chosen at random), each class's draws cycling through
        its images in a fresh seeded order. A multi-label image counts under its rarest label (the label with the
        fewest images), images without labels form a group of their own. Deterministic from (seed, epoch), sharded
        and resumed like the plain order, since it is the same plan."""
        if not self.train:
            raise ValueError("balanced sampling orders training batches; evaluation covers each sample once")
        if len(label_sets) != self.num_samples:
            raise ValueError(f"balance: {len(label_sets)} label sets for {self.num_samples} samples")
        frequency: dict[int, int] = {}
        for labels in label_sets:
            for c in labels:
                frequency[int(c)] = frequency.get(int(c), 0) + 1
        groups: dict[int, list[int]] = {}
        for i, labels in enumerate(label_sets):
            key = min((int(c) for c in labels), key=lambda c: (frequency[c], c), default=-1)
            groups.setdefault(key, []).append(i)
        self.groups = [torch.tensor(groups[k], dtype=torch.int64) for k in sorted(groups)]
        self._plan_epoch = None

    def _epoch_order(self, g: torch.Generator) -> torch.Tensor:
        """This epoch's num_samples sample indices in training order (the same on every rank)."""
        n = self.num_samples
        if self.groups is None:
            return torch.randperm(n, generator=g)
        k = len(self.groups)
        draws = torch.full((k,), n // k, dtype=torch.int64)
        draws[torch.randperm(k, generator=g)[: n % k]] += 1
        picked = []
        for group, count in zip(self.groups, draws.tolist()):
            cycles = -(-count // len(group))
            picked.append(torch.cat([group[torch.randperm(len(group), generator=g)] for _ in range(cycles)])[:count])
        order = torch.cat(picked)
        return order[torch.randperm(n, generator=g)]

    def set_augmentation(self, enabled: bool) -> None:
        """Turn training augmentation off (shuffled, sharded batches of evaluation-style images) or back on."""
        self.augmenting = bool(enabled and self.train)

    def plan(self) -> list[torch.Tensor]:
        """This rank's batches of sample indices for the current epoch."""
        if self._plan_epoch != self.epoch:
            n, ws = self.num_samples, self.world_size
            if self.train:
                g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
                # Every rank takes the same number of samples (the few left over change each epoch), and only full
                # batches, so DDP ranks step together and BatchNorm never sees a batch of one.
                per_rank = n // ws
                mine = self._epoch_order(g)[self.rank :: ws][:per_rank]
                full = per_rank // self.batch_size * self.batch_size or per_rank
                batches = list(mine[:full].split(self.batch_size))
            else:
                # Contiguous shards of sizes differing by at most one: each sample exactly once across ranks.
                start, stop = self.rank * n // ws, (self.rank + 1) * n // ws
                batches = list(torch.arange(start, stop).split(self.batch_size))
            self._plan_epoch, self._plan = self.epoch, batches
        return self._plan

    def __len__(self) -> int:
        return len(self.plan())

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (the same epoch again keeps the position, so set_epoch after a resume is harmless)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def _start(self) -> list[torch.Tensor]:
        if not self.train:  # an evaluation always covers the whole split, even after an abandoned pass
            self.position = 0
        elif self.position >= len(self):  # the previous epoch was finished and set_epoch not called: go on
            self.epoch, self.position = self.epoch + 1, 0
        return self.plan()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "sampler": "balanced" if self.groups is not None else "none",
        }

    def load_state_dict(self, state: dict) -> None:
        sampler = "balanced" if self.groups is not None else "none"
        if state.get("sampler", "none") != sampler:
            raise ValueError(
                f"loader state was saved with data.sampler={state.get('sampler', 'none')!r} but this loader has "
                f"{sampler!r}: resume needs the same sampler"
            )
        for key in ("num_samples", "batch_size", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has {getattr(self, key)}: "
                    "resume needs the same data, batch size and number of ranks"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        self._plan_epoch = None


class TensorLoader(Loader):
    """The cached uint8 pipeline: the whole dataset on the device, augmented a batch at a time.

    dense: the targets are per-pixel maps (N, H, W) (segmentation masks) that move with the pixels: cropped and
    flipped with them, padded with `ignore_index`. Otherwise targets are per image (labels, or multi-hot rows).
    """

    def __init__(
        self,
        data: fast.TensorData,
        *,
        batch_size: int,
        train: bool,
        device: torch.device,
        preprocess: dict,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: Sequence[str] = (),
        padding: int = 4,
        dense: bool = False,
        ignore_index: int = 255,
    ):
        super().__init__(len(data.labels), batch_size, train, seed, rank, world_size, data.classes, preprocess, device)
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.skipped = data.skipped
        self.augment, self.padding, self.dense = check_extras(augment), padding, dense
        if dense and tuple(self.images.shape[-2:]) != (preprocess["input_size"],) * 2:
            raise ValueError(f"dense targets need images at the input size {preprocess['input_size']}")
        # Training crops read from a copy padded once, so a batch costs one index and one gather.
        self.padded = torch.nn.functional.pad(self._fit_size(self.images), (padding,) * 4) if train else None
        self.padded_targets = None
        if train and dense:
            self.padded_targets = torch.nn.functional.pad(
                self.labels.to(torch.uint8), (padding,) * 4, value=ignore_index
            )

    def _fit_size(self, x: torch.Tensor) -> torch.Tensor:
        size = self.preprocess["input_size"]
        if x.shape[-1] == size and x.shape[-2] == size:
            return x
        from torchvision.transforms.v2 import functional as TF

        return TF.center_crop(TF.resize(x, self.preprocess["resize"], antialias=True), size)

    def transform_batch(
        self, idx: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised float batch of samples idx and its targets: random crop + flip (+ extras) when given a
        generator."""
        p = self.preprocess
        if generator is None:
            images = normalize(self._fit_size(self.images.index_select(0, idx)), p["mean"], p["std"])
            return images, self._targets(self.labels.index_select(0, idx))
        # index_select copies whole rows: 60x faster than advanced indexing (x[idx]) for uint8 here.
        n, dev, size = len(idx), idx.device, p["input_size"]
        offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=generator, device=dev)
        flip = torch.rand(n, generator=generator, device=dev) < 0.5
        x = fast.crop_flip_batch(self.padded.index_select(0, idx), offsets[0], offsets[1], flip, size, size)
        if self.dense:
            maps = self.padded_targets.index_select(0, idx).unsqueeze(1)
            targets = self._targets(fast.crop_flip_batch(maps, offsets[0], offsets[1], flip, size, size)[:, 0])
        else:
            targets = self.labels.index_select(0, idx)
        for name in self.augment:
            if name in ("trivialaugment", "randaugment", "autoaugment"):
                x = fast.policy_batch(x, name)
        if "colorjitter" in self.augment:
            x = fast.color_jitter_batch(x.float(), 0.4, generator)
        x = normalize(x, p["mean"], p["std"])
        if "erasing" in self.augment:
            x = fast.erase_batch(x, 0.25, generator)
        return x, targets

    def _targets(self, t: torch.Tensor) -> torch.Tensor:
        return t.long() if self.dense else t

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._start()
        while self.position < len(batches):
            b = self.position
            self.position += 1
            idx = batches[b].to(self.device)
            generator = None
            if self.train and self.augmenting:
                generator = torch.Generator(self.device).manual_seed(_mix(self.seed, self.epoch, b, self.rank))
            # Policy augmentations (TrivialAugment...) draw from the global RNG: seed it per batch for exact resume.
            policies = generator is not None and any(a.endswith("augment") for a in self.augment)
            with (
                _seeded(_mix(self.seed, self.epoch, b, self.rank, 1)) if policies else contextlib.nullcontext(),
                _one_thread() if self.device.type == "cpu" else contextlib.nullcontext(),
            ):
                batch = self.transform_batch(idx, generator)
            yield batch  # outside the one-thread context: the consumer's step gets every thread


@contextlib.contextmanager
def _one_thread():
    """Batch transforms on the CPU run on one intra-op thread: they are memory-bound copies, and on a busy 2-core
    machine two OpenMP threads waiting on each other made them 30x slower (2,100 vs 60,000 images/s, see
    BENCHMARKS.md). The model's own threads are restored before the batch is handed over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _seeded(seed: int):
    """The CPU generators (torch's and Python's) seeded with `seed` inside, restored after. Through the generator
    itself: torch.manual_seed also seeds every CUDA device, 0.5 ms a call, as long as decoding a small image."""
    generator = torch.default_generator
    torch_state, python_state = generator.get_state(), random.getstate()
    generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        generator.set_state(torch_state)
        random.setstate(python_state)


def collate_skipping(batch: list, stack: bool = True) -> tuple[Any, Any, list[tuple[str, str]]]:
    """Collate (image, target) samples, dropping SkippedSample entries: (images, targets, [(path, reason)]).

    stack: images and targets stacked into tensors (labels as int64); False keeps them as lists (detection: images
    of different sizes, a dict of boxes per image).
    """
    good, skipped = _split(batch)
    if not stack:
        return [s[0] for s in good], [s[1] for s in good], skipped
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), skipped
    return _stack([s[0] for s in good]), _labels([s[1] for s in good]), skipped


def _split(batch: list) -> tuple[list, list[tuple[str, str]]]:
    """(the samples, the (path, reason) of each SkippedSample)."""
    good = [s for s in batch if not isinstance(s, SkippedSample)]
    return good, [(s.path, s.reason) for s in batch if isinstance(s, SkippedSample)]


def _labels(targets: list) -> torch.Tensor:
    return torch.stack(targets) if isinstance(targets[0], torch.Tensor) else torch.tensor(targets, dtype=torch.int64)


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, into shared memory when this runs in a loader's worker process (as torch's default_collate
    does): the batch then reaches the main process without another copy into shared memory on the way."""
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(images)
    first = images[0]
    shape = (len(images), *first.shape)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * first.dtype.itemsize)
    return torch.stack(images, out=torch.empty(0, dtype=first.dtype).set_(storage, 0, shape))


def collate_lists(batch: list) -> tuple[list, list, list[tuple[str, str]]]:
    """`collate_skipping` without stacking (a module-level function: worker processes pickle it)."""
    return collate_skipping(batch, stack=False)


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors, and lists, tuples and dicts of them, moved to `device` (pinned memory copies asynchronously)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class _PlanSampler(torch.utils.data.Sampler):
    """Yields the loader's remaining batches of the epoch as [(index, seed)], read afresh each epoch (works with
    persistent workers). The seed drives that sample's random augmentation (None: no augmentation). With `slots`,
    [(index, seed, slot)]: the `BatchSlots` slot that batch is stacked into (batch number modulo their count)."""

    def __init__(self, loader: Loader, slots: int = 0):
        self.loader, self.slots = loader, slots

    def __iter__(self):
        loader = self.loader
        batches = loader.plan()
        for b in range(loader.position, len(batches)):
            slot = (b % self.slots,) if self.slots else ()
            yield [(i, self.seed(b, j, i), *slot) for j, i in enumerate(batches[b].tolist())]

    def seed(self, b: int, j: int, index: int) -> int | None:
        """Sample `index`'s augmentation seed, at place j of batch b: from (seed, epoch, index), so the number of
        workers never changes a batch; under balanced sampling, which draws an image several times an epoch, from
        its place in the plan, so every draw is augmented afresh."""
        loader = self.loader
        if not (loader.train and loader.augmenting):
            return None
        if loader.groups is not None:
            return _mix(loader.seed, loader.epoch, loader.rank, b, j, 4)
        return _mix(loader.seed, loader.epoch, index, 2)

    def __len__(self) -> int:
        return len(self.loader.plan()) - self.loader.position


class SeededSamples(torch.utils.data.Dataset):
    """`dataset[i]` with every random draw of its transform seeded by the sample's own seed, in whichever process
    loads it: augmentation then depends only on (seed, epoch, index), so resume and any number of workers give the
    same batches. The caller's RNG state is left as it was (the training process's is checkpointed)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int | None] | tuple[int, int | None, int]):
        index, seed, *slot = item  # slot: see `BatchSlots`, passed on with the sample
        if seed is None:
            sample = self.dataset[index]
        else:
            with _seeded(seed):
                sample = self.dataset[index]
        return sample if not slot or isinstance(sample, SkippedSample) else (*sample, *slot)


class BatchSlots:
    """Shared memory that worker processes stack a loader's uint8 batches into, the same few slots batch after
    batch; the batch that reaches this process is then a slot number, which it normalises into a float batch of its
    own. The DataLoader's way, a new shared-memory segment per batch, page-faults every page of it twice (the worker
    writing it, this process reading it): on the 2-core VM of BENCHMARKS.md that cost as much time as cutting and
    flipping the pixels. Slot b % count takes batch b; with count above the batches the DataLoader keeps in flight
    (prefetch_factor x workers), a slot is written again only after this process has read it. Images of another
    shape than the slots' are stacked the usual way."""

    def __init__(self, count: int, batch_size: int, image_shape: Sequence[int]) -> None:
        self.count = count
        shape = (count, batch_size, *image_shape)
        storage = torch.UntypedStorage._new_shared(math.prod(shape))  # untouched: pages come as slots fill
        self.images = torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)

    def collate(self, batch: list) -> tuple[Any, Any, list[tuple[str, str]]]:
        """`collate_skipping` of (image, target, slot) samples, the images stacked into their slot: (slot number,
        labels, skipped); `batch_of` gives the images back."""
        good, skipped = _split(batch)
        images = [s[0] for s in good]
        if not good or any(image.shape != self.images.shape[2:] for image in images):
            return collate_skipping([s if isinstance(s, SkippedSample) else s[:2] for s in batch])
        slot = good[0][2]
        torch.stack(images, out=self.images[slot, : len(images)])
        return slot, _labels([s[1] for s in good]), skipped

    def batch_of(self, images: torch.Tensor | int, count: int) -> torch.Tensor:
        """The batch a collate returned: its images, or the first `count` images of its slot."""
        return self.images[images, :count] if isinstance(images, int) else images


def default_workers() -> int:
    """Loader worker processes when a config does not say: one per core, at most 8 (`parallel_decoders`)."""
    return parallel_decoders()


class FileLoader(Loader):
    """A DataLoader over image files: worker processes decode and transform, pinned memory feeds the device.

    transform_for(augmenting) -> the dataset's transform (tasks give their own, e.g. one that moves boxes with the
    pixels). Without one, the preset's: workers then hand back uint8 images (a quarter of the float bytes to pass
    between processes; for the CPU, stacked into reused shared memory, `BatchSlots`), which this process normalises a
    batch at a time on the device (random erasing too); large JPEGs are decoded at the reduced scale the transform
    allows (`decode_min_size`, `RandomResizedCropPlan`).
    collate: `collate_skipping` (stacked batches) or `collate_lists` (lists, for images of different sizes).
    workers: None picks `default_workers()`. Call `close()` (or let the engine do it) to stop the workers.
    """

    def __init__(
        self,
        dataset,
        *,
        batch_size: int,
        train: bool,
        device: torch.device,
        preprocess: dict,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
        augment: Sequence[str] = (),
        transform_for: Callable[[bool], Callable] | None = None,
        collate: Callable = collate_skipping,
    ):
        super().__init__(
            len(dataset), batch_size, train, seed, rank, world_size, list(dataset.classes), preprocess, device
        )
        self._augment = augment
        self._batch_normalize = transform_for is None
        self._transform_for = transform_for or self._preset_transform
        self.dataset = dataset
        self._configure(train)
        # Workers hand bad files back as SkippedSample and this process decides: a clean BadImageError under strict
        # (an exception raised inside a worker would arrive re-wrapped, with its traceback in the message).
        self.strict = getattr(dataset, "strict", False)
        if hasattr(dataset, "strict"):
            dataset.strict = False
        self.skipped: list[tuple[str, str]] = []
        self._reported: set[str] = set()
        workers = default_workers() if workers is None else workers
        prefetch = 4 if workers > 0 else None
        # Preset batches for the CPU are stacked into reused shared memory; for an accelerator the DataLoader's
        # pinned copies (made by its own thread) feed asynchronous transfers.
        self._slots = None
        if self._batch_normalize and collate is collate_skipping and device.type == "cpu":
            size = preprocess["input_size"]
            self._slots = BatchSlots(prefetch * workers + 1 if workers else 1, batch_size, (3, size, size))
            collate = self._slots.collate
        self.loader = torch.utils.data.DataLoader(
            SeededSamples(dataset),
            batch_sampler=_PlanSampler(self, self._slots.count if self._slots else 0),
            num_workers=workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=prefetch,
            generator=torch.Generator().manual_seed(_mix(seed, rank)),
        )

    def _planned(self, augmenting: bool) -> bool:
        """The imagenet training crop chosen before decoding (the dataset cuts it, the transform resizes it)."""
        return (
            self._batch_normalize
            and augmenting
            and self.preprocess["preset"] == "imagenet"
            and getattr(self.dataset, "accepts_decode_hints", False)
        )

    def _preset_transform(self, augmenting: bool):
        p = self.preprocess
        transform = build_transform(
            p["preset"],
            augmenting,
            p["mean"],
            p["std"],
            self._augment,
            p["input_size"],
            planned_crop=self._planned(augmenting),
            normalized=False,
        )
        done = getattr(self.dataset, "pixels", None)
        done = done.head if done is not None else []
        if done:  # the pixel cache holds the images with the transform's first steps done (`fixed_head`)
            steps = transform.transforms
            if [repr(step) for step in steps[: len(done)]] != done:
                raise ValueError(f"the pixel cache's images were stored after {done}, not this transform's {steps}")
            transform = v2.Compose(steps[len(done) :])
        return transform

    def _configure(self, augmenting: bool) -> None:
        self.dataset.transform = self._transform_for(augmenting)
        if self._batch_normalize and hasattr(self.dataset, "crop_plan"):
            planned = self._planned(augmenting)
            self.dataset.min_size = decode_min_size(self.preprocess, augmenting)
            self.dataset.crop_plan = RandomResizedCropPlan(self.preprocess["input_size"]) if planned else None

    def set_augmentation(self, enabled: bool) -> None:
        """As Loader.set_augmentation; call it before iterating (persistent workers hold a copy of the dataset)."""
        super().set_augmentation(enabled)
        self._configure(self.augmenting)

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        """A preset batch: uint8 from the workers -> normalised (and randomly erased) on the device."""
        p = self.preprocess
        images = normalize(images.to(self.device, non_blocking=True), p["mean"], p["std"])
        if "erasing" in self._augment and self.train and self.augmenting:
            seed = _mix(self.seed, self.epoch, self.position, self.rank, 3)
            images = fast.erase_batch(images, 0.25, torch.Generator(self.device).manual_seed(seed))
        return images

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        self._start()
        new = []
        try:
            for images, targets, skipped in self.loader:
                self.position += 1
                if skipped and self.strict:
                    raise BadImageError(*skipped[0])
                for path, reason in skipped:
                    if path not in self._reported:
                        self._reported.add(path)
                        new.append((path, reason))
                if len(targets):
                    if self._slots is not None:
                        images = self._slots.batch_of(images, len(targets))
                    images = self._finish(images) if self._batch_normalize else to_device(images, self.device)
                    yield images, to_device(targets, self.device)
        finally:  # also when the consumer stops early: every bad file is reported once
            self.skipped += new
            report_skipped(new, self.num_samples)

    def close(self) -> None:
        """Stop the worker processes now (an abandoned pass keeps them waiting until garbage collection, which may
        run in a forked child, where their shutdown fails: "can only test a child process")."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


def _dataset_stats(dataset, data: fast.TensorData | None, cache_dir, strict: bool):
    """Normalisation statistics for the cifar preset: the dataset's own (its training split's), else ImageNet's."""
    if isinstance(dataset, CIFAR):
        return (CIFAR100_MEAN, CIFAR100_STD) if dataset.name == "cifar100" else (CIFAR10_MEAN, CIFAR10_STD)
    if isinstance(dataset, (Shapes, ShapesMulti)):
        return SHAPES_MEAN, SHAPES_STD
    if isinstance(dataset, CifarMosaic):  # tiles of CIFAR-10 images
        return CIFAR10_MEAN, CIFAR10_STD
    listed = getattr(dataset, "listed_split", getattr(dataset, "split", None))
    if isinstance(dataset, (ImageFolder, CsvListing)) and listed == "train" and data is not None:
        return data.mean, data.std  # a training split cut by split lists, or a listing's training rows
    if isinstance(dataset, ImageFolder) and data is not None:
        train = dataset if dataset.root.name == "train" else None
        if train is None and (dataset.root.parent / "train").is_dir():
            train = build_dataset(str(dataset.root.parent), "train", strict=strict, image_size=dataset.image_size)
        if train is not None:
            stats = data if train is dataset else fast.load_tensors(train, cache_dir, strict)
            return stats.mean, stats.std
    return IMAGENET_MEAN, IMAGENET_STD  # large images, or no training split to measure


def build_loader(
    name_or_path: str | os.PathLike,
    split: str = "train",
    *,
    preset: str | dict,
    batch_size: int,
    train: bool,
    device: str | torch.device = "cpu",
    seed: int = 0,
    workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    fast: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    strict: bool = False,
    root: str | os.PathLike | None = None,
    augment: Sequence[str] = (),
    download: bool = False,
    image_size: int | None = None,
    subset: int | None = None,
    columns: dict | None = None,
    splits: str | os.PathLike | None = None,
    sampler: str = "none",
    pixel_cache: bool = False,
) -> Loader:
    """A Loader over a dataset named as in `build_dataset`.

    `preset`: "cifar", "imagenet", "cub448", or a checkpoint's `preprocess` dict (evaluation with the training
    normalisation). `fast=None` picks the cached tensor pipeline for small images with the cifar preset, the
    DataLoader otherwise. `augment`: optional augmentations by name (trivialaugment, randaugment, autoaugment,
    colorjitter, erasing), applied only when training. Training batches are shuffled per epoch, sharded by
    rank/world_size, and full (the last partial batch is dropped); evaluation batches cover every sample once.
    `subset`: a stratified, seeded subset of this many samples (`stratified_indices` with `seed`; multi-label:
    iterative stratification). `columns`, `splits`: as `build_dataset` (CSV columns, split lists). `sampler`:
    "none", or "balanced" (training only: `Loader.balance`). `pixel_cache`: image files are decoded once into
    `fast.PixelCache` under cache_dir and read from it after (no effect where the images are already held decoded:
    the tensor pipeline, CIFAR, rendered datasets). Targets are int64 labels, or float32 multi-hot rows
    (C,) for a multi-label dataset (`dataset.multilabel`).
    """
    if sampler not in ("none", "balanced"):
        raise ValueError(f"sampler must be 'none' or 'balanced', got {sampler!r}")
    device = torch.device(device)
    augment = check_extras(augment)
    given = check_preprocess(preset) if isinstance(preset, dict) else None
    preset_name = given["preset"] if given else preset
    dataset = build_dataset(
        name_or_path,
        split,
        root=root,
        strict=strict,
        download=download,
        image_size=image_size,
        columns=columns,
        splits=splits,
    )
    if subset is not None and subset < len(dataset):
        dataset.select(subset_indices(dataset, subset, seed))
    rendered = (CIFAR, Shapes, ShapesMulti, CifarMosaic)  # small images held or rendered in memory
    files = isinstance(dataset, (ImageFolder, CsvListing))
    small = isinstance(dataset, rendered) or (files and fast_candidate(dataset))
    if fast is None:
        fast = small and preset_name == "cifar"
    elif fast and not (isinstance(dataset, rendered) or hasattr(dataset, "samples")):
        raise ValueError(f"the fast pipeline cannot read {name_or_path}")
    if fast and preset_name != "cifar":
        raise ValueError(
            f"the fast pipeline does the 'cifar' preset (pad-crop + flip); got preset {preset_name!r}: "
            "use fast=False for per-sample presets"
        )
    from resnetkit.data import fast as fastlib

    data = fastlib.load_tensors(dataset, cache_dir, strict) if fast else None
    if given:
        preprocess = given
    else:
        mean = std = None
        if preset_name == "cifar":
            mean, std = _dataset_stats(dataset, data, cache_dir, strict)
        size = data.images.shape[-1] if data is not None and preset_name == "cifar" else None
        if size is None and preset_name == "cifar" and isinstance(dataset, (Shapes, ShapesMulti, CifarMosaic)):
            size = dataset.image_size
        preprocess = preprocess_info(preset_name, mean, std, input_size=size)
    if not fast and hasattr(dataset, "pixels"):  # image files, decoded sample by sample
        if pixel_cache:
            # Stored with the transform's fixed first steps done, where nothing comes before them (a bird box crop,
            # a fixed image_size): the workers then only crop and flip.
            head = fixed_head(preprocess, train) if dataset.accepts_decode_hints else []
            dataset.pixels = fastlib.pixel_cache(dataset, cache_dir, head=head)
        elif train and dataset.samples:
            log.info(
                "each epoch decodes the %d image files again; data.pixel_cache: true decodes them once into a cache "
                "on disk (for photos of up to a few megapixels 3-5x the images/s in BENCHMARKS.md)",
                len(dataset.samples),
            )
    common = dict(
        batch_size=batch_size,
        train=train,
        device=device,
        preprocess=preprocess,
        seed=seed,
        rank=rank,
        world_size=world_size,
        augment=augment if train else (),
    )
    loader = TensorLoader(data, **common) if fast else FileLoader(dataset, workers=workers, **common)
    if sampler == "balanced" and train:
        from resnetkit.data.splits import label_sets_of

        # The tensor cache's rows are what is sampled (it leaves out unreadable files); else the dataset's items.
        labels = data.labels if fast else None
        if labels is None:
            sets = label_sets_of(dataset)
        elif labels.ndim == 2:
            sets = [row.nonzero().flatten().tolist() for row in labels]
        else:
            sets = labels[:, None].tolist()
        loader.balance(sets)
    return loader


def subset_indices(dataset, n: int, seed: int) -> list[int]:
    """A stratified, seeded subset of n samples: per class (`stratified_indices`), or by iterative stratification
    over the label sets of a multi-label dataset."""
    if getattr(dataset, "multilabel", False):
        from resnetkit.data.splits import stratified_subset

        return stratified_subset(dataset.label_sets, len(dataset.classes), n, seed)
    return stratified_indices(dataset.targets, n, seed)


def fast_candidate(dataset) -> bool:
    """An ImageFolder whose images are small enough for the tensor cache (judged by the first image)."""
    side = fast.first_image_side(dataset)
    return 0 < side <= fast.SMALL_IMAGE_MAX
