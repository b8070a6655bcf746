"""The DALI backend: JPEG decoding and augmentation in DALI pipelines, on the GPU or the CPU.

Training: ``decoders.image_random_crop`` fuses the RandomResizedCrop window (area `data.crop_area`, 0.08-1 by default;
aspect 3/4-4/3) into decoding, so only the region of interest is decoded (nvJPEG / the A100+
hardware decoder with ``device="mixed"``, libjpeg-turbo on the CPU); then a bilinear antialiased
resize to ``image_size`` and one ``crop_mirror_normalize`` that flips at random, normalizes and
writes HWC ``float32``/``float16``. ``permute(0, 3, 1, 2)`` turns that into an NCHW tensor in
channels_last memory without a copy.

Validation reproduces torchvision's ``Resize(val_resize)`` + ``CenterCrop(image_size)``
geometry exactly (same output sizes, same half-to-even crop offset), so accuracy measured here
matches accuracy measured with torchvision transforms up to decoder/interpolation rounding.

Sample order: the file names come from an ``external_source`` fed, batch by batch, from the same
`fastkd.data.sharding.ShardPlan` the torch backend uses, and ``io.file.read`` reads them in DALI's
threads. DALI's own reader shuffling was not used because its order follows DALI's internal
epoch counter (``set_epoch`` could not select an epoch, e.g. after resuming), and with shards of
unequal size ``pad_last_batch`` leaks a batch of padding duplicates into the next epoch.
Consecutive passes reuse one pipeline; a pass broken off early is followed by a rebuild.

Bad images: a decode failure stops the pipeline. The loader finds the culprit among the files in
flight (DALI's message names it, or PIL confirms it), then raises a `DataError` naming it
(``on_bad_image=error``) or warns, leaves it out and rebuilds the pipeline to go on from the first
batch not yet delivered (``skip``; a training sample is replaced by the next file of the list so
the batch shape stays fixed). The augmentation generator is reseeded by such a rebuild.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image

from fastkd.data.folder import (
    DataError,
    SplitIndex,
    bad_image_error,
    bad_image_message,
    warn_skipped,
)
from fastkd.data.sharding import ShardPlan

# nvJPEG memory padding and hardware-decoder preallocation sized for the largest ImageNet image,
# the values NVIDIA's ResNet-50 example uses: no reallocation stalls once training runs.
_DEVICE_MEMORY_PADDING = 211_025_920
_HOST_MEMORY_PADDING = 140_544_512
_PREALLOCATE_WIDTH_HINT = 5980
_PREALLOCATE_HEIGHT_HINT = 6430


def _read_files(source: _PlanSource) -> tuple[Any, Any]:
    """File names and labels from the plan, then the encoded bytes read in DALI's threads."""
    paths, labels = fn.external_source(
        source=source,
        num_outputs=2,
        batch=True,
        cycle="raise",  # the end of a pass ends the iterator's epoch; the next pass re-iterates
        dtype=[types.UINT8, types.INT32],
        ndim=[1, 0],
    )
    return fn.io.file.read(paths), labels


@pipeline_def
def train_pipeline(
    source: _PlanSource,
    *,
    decoder_device: str,
    decoder_args: dict[str, Any],
    image_size: int,
    crop_area: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
    out_dtype: Any,
) -> tuple[Any, Any]:
    """Decode a random crop, resize it to ``image_size``, flip at random, normalize to HWC."""
    encoded, labels = _read_files(source)
    images = fn.decoders.image_random_crop(
        encoded,
        device=decoder_device,
        output_type=types.RGB,
        adjust_orientation=False,  # as PIL/torchvision, which ignore EXIF orientation
        random_area=list(crop_area),
        random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0],
        num_attempts=10,
        **decoder_args,
    )
    images = fn.resize(
        images,
        resize_x=image_size,
        resize_y=image_size,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    images = fn.crop_mirror_normalize(
        images,
        dtype=out_dtype,
        output_layout="HWC",
        mean=list(mean),
        std=list(std),
        mirror=fn.random.coin_flip(probability=0.5),
    )
    if decoder_device == "mixed":
        labels = labels.gpu()
    return images, labels


@pipeline_def
def val_pipeline(
    source: _PlanSource,
    *,
    decoder_device: str,
    decoder_args: dict[str, Any],
    image_size: int,
    val_resize: int,
    mean: Sequence[float],
    std: Sequence[float],
    out_dtype: Any,
) -> tuple[Any, Any]:
    """torchvision's Resize(val_resize) + CenterCrop(image_size), normalized to HWC."""
    encoded, labels = _read_files(source)
    shape = fn.peek_image_shape(encoded, dtype=types.INT32, adjust_orientation=False)
    height, width = shape[0], shape[1]
    shorter = dmath.min(height, width)
    # torchvision sizes the longer side as int(val_resize * long / short): integer division.
    out_height = (val_resize * height) // shorter
    out_width = (val_resize * width) // shorter
    images = fn.decoders.image(
        encoded,
        device=decoder_device,
        output_type=types.RGB,
        adjust_orientation=False,
        **decoder_args,
    )
    images = fn.resize(
        images,
        resize_x=fn.cast(out_width, dtype=types.FLOAT),
        resize_y=fn.cast(out_height, dtype=types.FLOAT),
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    images = fn.crop_mirror_normalize(
        images,
        crop=(image_size, image_size),
        crop_pos_x=_center_crop_position(out_width, image_size),
        crop_pos_y=_center_crop_position(out_height, image_size),
        dtype=out_dtype,
        output_layout="HWC",
        mean=list(mean),
        std=list(std),
    )
    if decoder_device == "mixed":
        labels = labels.gpu()
    return images, labels


def _center_crop_position(size: Any, crop: int) -> Any:
    """The crop offset torchvision uses, as the relative position crop_mirror_normalize takes.

    torchvision's offset is ``int(round((size - crop) / 2))`` with Python's half-to-even
    rounding; DALI's default (0.5) rounds the other way on odd margins, a one-pixel shift.
    """
    margin = size - crop
    half = margin // 2
    odd_margin = margin - 2 * half
    odd_half = half - 2 * (half // 2)
    offset = half + odd_margin * odd_half
    # A quarter pixel inside the target keeps both rounding and truncation of position*margin
    # on the same integer offset.
    position = (fn.cast(offset, dtype=types.FLOAT) + 0.25) / fn.cast(
        dmath.max(margin, 1), dtype=types.FLOAT
    )
    return dmath.min(position, 1.0)


class _PlanSource:
    """The ``external_source`` iterable: each pass yields the batches the loader planned last.

    DALI calls ``iter()`` on it as soon as the previous pass ends (before the trainer can call
    ``set_epoch``), so the generator reads the plan lazily, at its first step, which DALI only
    takes when the next pass starts.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int]) -> None:
        self._files = files
        self._labels = np.asarray(labels, dtype=np.int32)
        self._batches: list[np.ndarray] = []
        self.emitted: list[np.ndarray] = []

    def set_batches(self, batches: list[np.ndarray]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        return self._generate()

    def _generate(self) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        batches = self._batches
        self.emitted = []
        for positions in batches:
            self.emitted.append(positions)
            encoded_paths = [
                np.frombuffer(self._files[p].encode("utf-8"), dtype=np.uint8) for p in positions
            ]
            yield encoded_paths, self._labels[positions]


def _pil_decode_problem(path: str) -> str | None:
    """Why PIL cannot decode ``path`` (None when it can): the check behind DALI's failures."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError...
        return f"cannot be decoded ({exc})"
    return None


def _pipeline_seed(*parts: int) -> int:
    return int(
        np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF
    )


class DaliLoader:
    """Batches ``(images, labels)`` of one split for one rank from a DALI pipeline.

    See `fastkd.data.build_train_loader` for the protocol every loader follows.
    """

    def __init__(
        self,
        index: SplitIndex,
        *,
        train: bool,
        image_size: int,
        val_resize: int,
        batch_size: int,
        workers: int,
        prefetch: int,
        mean: Sequence[float],
        std: Sequence[float],
        on_bad_image: Literal["error", "skip"],
        device: torch.device,
        use_gpu: bool,
        crop_area: tuple[float, float] = (0.08, 1.0),
        hw_decoder_load: float = 0.65,
        preallocate: bool = True,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"DALI batches can be float32 or float16, not {dtype}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if use_gpu and device.type != "cuda":
            raise DataError(
                f"data.dali_device=gpu needs a CUDA device, but the batches go to {device}: "
                "set data.dali_device=auto or cpu"
            )
        self.index = index
        self.classes = list(index.classes)
        self.num_classes = len(index.classes)
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.train = train
        self.epoch = 0
        self.backend = "dali-gpu" if use_gpu else "dali-cpu"
        self.on_bad_image = on_bad_image
        self.plan = ShardPlan(
            len(index),
            train=train,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
        )
        self.num_samples = self.plan.num_samples
        self._seed = seed
        self._rank = rank
        self._excluded: set[int] = set()
        self._builds = 0
        self._pipe: Any = None
        self._iterator: DALIGenericIterator | None = None
        self._source: _PlanSource | None = None
        self._pass_open = False
        self._source_offset = 0
        decoder_args: dict[str, Any] = {}
        if use_gpu:
            decoder_args["hw_decoder_load"] = hw_decoder_load
            if preallocate:
                decoder_args.update(
                    device_memory_padding=_DEVICE_MEMORY_PADDING,
                    host_memory_padding=_HOST_MEMORY_PADDING,
                    preallocate_width_hint=_PREALLOCATE_WIDTH_HINT,
                    preallocate_height_hint=_PREALLOCATE_HEIGHT_HINT,
                )
        self._pipeline_kwargs: dict[str, Any] = dict(
            decoder_device="mixed" if use_gpu else "cpu",
            decoder_args=decoder_args,
            image_size=image_size,
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
            out_dtype=types.FLOAT16 if dtype == torch.float16 else types.FLOAT,
        )
        if train:
            self._pipeline_kwargs["crop_area"] = (float(crop_area[0]), float(crop_area[1]))
        else:
            self._pipeline_kwargs["val_resize"] = val_resize
        self._runtime_kwargs: dict[str, Any] = dict(
            batch_size=batch_size,
            num_threads=max(1, workers),
            device_id=device.index if use_gpu else None,
            prefetch_queue_depth=prefetch,
        )

    def __len__(self) -> int:
        return self.plan.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next pass uses."""
        self.epoch = epoch

    def shard_indices(self) -> np.ndarray:
        """Positions in ``index.files`` this rank reads in the current epoch, in order."""
        return self.plan.indices(self.epoch)

    # -- pipeline lifetime ---------------------------------------------------------------------

    def _make_pipeline(self, source: _PlanSource) -> Any:
        """The (not yet built) DALI pipeline of this loader, reading from ``source``."""
        make = train_pipeline if self.train else val_pipeline
        return make(
            source,
            **self._pipeline_kwargs,
            **self._runtime_kwargs,
            seed=_pipeline_seed(self._seed, self._rank, self.epoch, self._builds),
        )

    def _build(self) -> None:
        """(Re)create the pipeline and its iterator; the previous ones are released first."""
        self._release()
        self._builds += 1
        self._source = _PlanSource(self.index.files, self.index.labels)
        self._pipe = self._make_pipeline(self._source)
        self._iterator = DALIGenericIterator(
            self._pipe, ["images", "labels"], auto_reset=False, prepare_first_batch=False
        )

    def _release(self) -> None:
        self._iterator = None
        self._pipe = None
        self._source = None

    def close(self) -> None:
        """Release the pipeline (its threads and buffers); the loader can be iterated again."""
        self._release()
        self._pass_open = False

    # -- planning --------------------------------------------------------------------------------

    def _planned_batches(self) -> list[np.ndarray]:
        """This pass's batches, with files found bad at run time replaced (train) or left out."""
        batches = self.plan.batches(self.epoch)
        if not self._excluded:
            return batches
        if not self.train:
            kept = [batch[~np.isin(batch, list(self._excluded))] for batch in batches]
            return [batch for batch in kept if len(batch)]
        total = len(self.index)
        if len(self._excluded) >= total:
            raise DataError(f"{self.index.root}: every image was skipped as undecodable")
        replaced = []
        for batch in batches:
            batch = batch.copy()
            for i, position in enumerate(batch):
                while position in self._excluded:
                    position = (position + 1) % total
                batch[i] = position
            replaced.append(batch)
        return replaced

    # -- iteration ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_samples == 0:  # a validation rank with no image (fewer images than ranks)
            return
        if self._iterator is None or self._pass_open:
            # A pass broken off early leaves batches queued in the pipeline: start afresh.
            self._build()
        batches = self._planned_batches()
        assert self._source is not None and self._iterator is not None
        self._source.set_batches(batches)
        self._source_offset = 0  # the pass's batch index of the source's first batch
        self._pass_open = True
        iter(self._iterator)  # after a finished pass, resets the pipeline for the next one
        delivered = 0
        while True:
            try:
                outputs = next(self._iterator)
            except StopIteration:
                break
            except RuntimeError as exc:
                if not self._recover(exc, delivered):
                    raise
                # Go on from the first batch not delivered, with the bad file(s) replaced.
                batches = batches[:delivered] + self._planned_batches()[delivered:]
                self._source.set_batches(batches[delivered:])
                self._source_offset = delivered
                continue
            delivered += 1
            yield self._to_torch(outputs[0])
        self._pass_open = False

    def _to_torch(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # NHWC -> NCHW by strides only: channels_last memory, no copy.
        images = outputs["images"].permute(0, 3, 1, 2)
        if images.device != self.device:  # CPU pipeline feeding a GPU
            images = images.to(self.device, non_blocking=True)
        labels = outputs["labels"].to(self.device, torch.int64, non_blocking=True).view(-1)
        return images, labels

    def _recover(self, exc: RuntimeError, delivered: int) -> bool:
        """Handle a pipeline failure: False if no bad file explains it, else raise or rebuild."""
        assert self._source is not None
        undelivered = self._source.emitted[delivered - self._source_offset :]
        in_flight = [int(p) for batch in undelivered for p in batch]
        message = str(exc)
        files = self.index.files
        bad = {p: "the DALI decoder failed on it" for p in in_flight if files[p] in message}
        if not bad:
            for position in in_flight:
                reason = _pil_decode_problem(files[position])
                if reason is not None:
                    bad[position] = reason
        if not bad:
            return False
        problems = [bad_image_message(files[p], reason) for p, reason in sorted(bad.items())]
        if self.on_bad_image == "error":
            self.close()
            raise bad_image_error(problems) from None
        warn_skipped(problems)
        self._excluded.update(bad)
        self._build()
        self._pass_open = True
        return True
