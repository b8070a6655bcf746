"""The DALI backend: JPEG decoding and augmentation in DALI pipelines, on the GPU or the CPU.

Training: ``decoders.image_slice`` decodes only the RandomResizedCrop window (area
``data.crop_area``, 0.08-1 by default; aspect 3/4-4/3, up to 10 attempts, then torchvision's
centre-crop fallback) with nvJPEG / the A100+ hardware decoder (``device="mixed"``) or
libjpeg-turbo on the CPU; then a bilinear antialiased resize to ``image_size`` and one
``crop_mirror_normalize`` that flips, normalizes and writes ``float32``/``float16``. With
``train.channels_last`` the layout is HWC and ``permute(0, 3, 1, 2)`` turns it into an NCHW tensor in
channels_last memory without a copy; otherwise DALI writes CHW, a contiguous NCHW batch.

Augmentation randomness does not come from DALI's own generators, whose state would depend on
how long a pipeline has run: each sample's window and flip are computed in the pipeline from
uniform numbers fed with its file name, drawn from the sample's seed in
`fastkd.data.sharding.ShardPlan` (a function of run seed, epoch and position only). An epoch's
crops are therefore the same in a resumed run, after a rebuild and for any thread count: a
sample's crop never depends on where a run resumed, and a pass started at batch k
(``set_epoch(epoch, start_batch=k)``) yields bitwise the batches k, k+1, ... of a whole pass.

Validation reproduces torchvision's ``Resize(val_resize)`` + ``CenterCrop(image_size)``
geometry exactly (same output sizes, same half-to-even crop offset), and the GPU decoder uses
libjpeg's "fancy" chroma upsampling, so accuracy measured here matches accuracy measured with
PIL and torchvision transforms up to interpolation rounding.

Sample order: the file names come from an ``external_source`` fed, batch by batch, from the same
`fastkd.data.sharding.ShardPlan` the torch backend uses, and ``io.file.read`` reads them in DALI's
threads. A loader builds its pipeline once and reuses it for every pass, whole or started
mid-epoch: a pass ends as soon as its last planned batch is delivered (the trainer never has to
ask for one more), and only a pass broken off early (an exception) or a bad image met at run
time forces a rebuild.

Memory (GPU decoding): the training decoder preallocates nvJPEG buffers sized for the largest
ImageNet image (``data.dali.preallocate``), per DALI thread (``data.workers``): one device buffer
of 201 MiB and two pinned host buffers of 134 MiB each, so about 1.6 GiB of GPU memory and 2.1 GiB
of pinned host memory per process at 8 threads (`decoder_padding_bytes`). The validation decoder
gets no padding: it grows its buffers on demand in a few short passes.

Bad images: a decode failure stops the pipeline. The loader finds the culprit among the files in
flight (DALI's message names it, or PIL confirms it), then raises a `DataError` naming it
(``on_bad_image=error``) or warns, leaves it out and rebuilds the pipeline to go on from the first
batch not yet delivered (``skip``; a training sample is replaced by the next file of the list so
the batch shape stays fixed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image

from fastkd.data.folder import (
    SplitIndex,
    bad_image_error,
    bad_image_message,
    warn_skipped,
)
from fastkd.data.sharding import sample_uniforms
from fastkd.data.spec import LoaderSpec, PlannedLoader
from fastkd.errors import DataError

# nvJPEG memory padding and hardware-decoder preallocation sized for the largest ImageNet image,
# the values NVIDIA's ResNet-50 example uses: no reallocation stalls once training runs.
_DEVICE_MEMORY_PADDING = 211_025_920
_HOST_MEMORY_PADDING = 140_544_512
_PREALLOCATE_WIDTH_HINT = 5980
_PREALLOCATE_HEIGHT_HINT = 6430

# RandomResizedCrop as torchvision draws it: aspect ratios log-uniform in [3/4, 4/3], up to
# CROP_ATTEMPTS (area, ratio) draws, the first whose window fits the image wins.
CROP_ATTEMPTS = 10
_MIN_RATIO, _MAX_RATIO = 3.0 / 4.0, 4.0 / 3.0
# Per training sample: CROP_ATTEMPTS area and ratio draws, a window position (x, y), a flip.
_UNIFORMS_PER_SAMPLE = 2 * CROP_ATTEMPTS + 3


def decoder_padding_bytes(workers: int) -> tuple[int, int]:
    """(GPU, pinned host) bytes the GPU training decoder preallocates with data.dali.preallocate.

    DALI's documentation: one device buffer of ``device_memory_padding`` per thread, and two
    (double buffering) host buffers of ``host_memory_padding`` per thread.
    """
    threads = max(1, workers)
    return threads * _DEVICE_MEMORY_PADDING, 2 * threads * _HOST_MEMORY_PADDING


def crop_draws(uniforms: np.ndarray, crop_area: tuple[float, float]) -> dict[str, np.ndarray]:
    """The training augmentation's random draws from `sample_uniforms` rows (one per sample).

    Each of the CROP_ATTEMPTS candidate windows has an area fraction ``a`` (uniform in
    ``crop_area``) and an aspect ratio ``r`` (width / height, log-uniform in [3/4, 4/3]), passed
    as ``area_x_ratio`` = a * r and ``area_per_ratio`` = a / r (N x CROP_ATTEMPTS), the two
    products `crop_window` needs. ``position`` (N x 2): where the window sits in the room left,
    x then y; ``flip`` (N,): 1 to mirror horizontally.
    """
    k = CROP_ATTEMPTS
    low, high = crop_area
    area = low + (high - low) * uniforms[:, :k]
    log_low, log_high = np.log(_MIN_RATIO), np.log(_MAX_RATIO)
    ratio = np.exp(log_low + (log_high - log_low) * uniforms[:, k : 2 * k])
    return {
        "area_x_ratio": (area * ratio).astype(np.float32),
        "area_per_ratio": (area / ratio).astype(np.float32),
        "position": np.ascontiguousarray(uniforms[:, 2 * k : 2 * k + 2], dtype=np.float32),
        "flip": (uniforms[:, 2 * k + 2] < 0.5).astype(np.int32),
    }


def crop_window(
    encoded: Any, area_x_ratio: Any, area_per_ratio: Any, position: Any
) -> tuple[Any, Any]:
    """The relative (anchor, shape) of each sample's RandomResizedCrop window, as DALI nodes.

    A window of area fraction ``a`` and aspect ratio ``r`` on an image of aspect ``s = W / H``
    has relative width ``sqrt(a * r / s)`` and height ``sqrt(a / r * s)``: it fits when both are
    at most 1. The first fitting draw wins, as in torchvision; when none fits, torchvision's
    fallback: the whole image cropped to the nearest allowed aspect ratio, centred. Per-sample
    arithmetic on DALI's CPU (each operator costs per sample, so the draws arrive as the
    products it needs); ``peek_image_shape`` reads the header, nothing is decoded for it.
    """
    shape = fn.peek_image_shape(encoded, dtype=types.FLOAT, adjust_orientation=False)
    aspect = shape[1] / shape[0]
    fits = (area_x_ratio <= aspect) & (area_per_ratio * aspect <= 1.0)
    # The first fitting draw: the largest of the distinct powers of two of the fitting ones
    # (when none fits, every draw is "first" and the result is discarded below).
    priority = types.Constant(
        np.array([2.0 ** (CROP_ATTEMPTS - 1 - i) for i in range(CROP_ATTEMPTS)], np.float32)
    )
    score = fits * priority
    best = fn.reductions.max(score)
    first = score == best
    found, fallback = best > 0, best <= 0
    width = found * dmath.sqrt(fn.reductions.sum(first * area_x_ratio) / aspect)
    height = found * dmath.sqrt(fn.reductions.sum(first * area_per_ratio) * aspect)
    size = fn.stack(
        width + fallback * dmath.min(1.0, _MAX_RATIO / aspect),
        height + fallback * dmath.min(1.0, aspect / _MIN_RATIO),
    )
    anchor = (1.0 - size) * (found * position + fallback * 0.5)
    return anchor, size


def _read_files(source: _PlanSource, *, train: bool) -> list[Any]:
    """The plan's file names and labels (for training also the `crop_draws`: area_x_ratio,
    area_per_ratio, position, flip), with the files' bytes read in DALI's threads for the names."""
    dtypes, ndims = [types.UINT8, types.INT32], [1, 0]
    if train:
        dtypes += [types.FLOAT, types.FLOAT, types.FLOAT, types.INT32]
        ndims += [1, 1, 1, 0]
    paths, *rest = fn.external_source(
        source=source,
        num_outputs=len(dtypes),
        batch=True,
        cycle="raise",  # the end of a pass ends the iterator's epoch; the next pass re-iterates
        dtype=dtypes,
        ndim=ndims,
    )
    return [fn.io.file.read(paths), *rest]


@pipeline_def
def train_pipeline(
    source: _PlanSource,
    *,
    decoder_device: str,
    decoder_args: dict[str, Any],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    out_dtype: Any,
    layout: str,
) -> tuple[Any, Any]:
    """Decode the sample's crop window, resize it to ``image_size``, flip, normalize."""
    encoded, labels, area_x_ratio, area_per_ratio, position, flip = _read_files(source, train=True)
    anchor, window = crop_window(encoded, area_x_ratio, area_per_ratio, position)
    images = fn.decoders.image_slice(
        encoded,
        anchor,
        window,
        normalized_anchor=True,
        normalized_shape=True,
        axis_names="WH",
        device=decoder_device,
        output_type=types.RGB,
        adjust_orientation=False,  # as PIL/torchvision, which ignore EXIF orientation
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
        images, dtype=out_dtype, output_layout=layout, mean=list(mean), std=list(std), mirror=flip
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
    layout: str,
) -> tuple[Any, Any]:
    """torchvision's Resize(val_resize) + CenterCrop(image_size), normalized."""
    encoded, labels = _read_files(source, train=False)
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
        output_layout=layout,
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
    takes when the next pass starts. For training, each batch also carries its samples'
    `crop_draws`, computed from their seeds.
    """

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        crop_area: tuple[float, float] | None,
    ) -> None:
        self._files = files
        self._labels = np.asarray(labels, dtype=np.int32)
        self._crop_area = crop_area  # None: validation, no augmentation inputs
        self._batches: list[tuple[np.ndarray, np.ndarray]] = []
        self.emitted: list[np.ndarray] = []

    def set_batches(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """The pass's batches as (file positions, sample seeds) pairs."""
        self._batches = batches

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self._generate()

    def _generate(self) -> Iterator[tuple[Any, ...]]:
        batches = self._batches
        self.emitted = []
        for positions, seeds in batches:
            self.emitted.append(positions)
            encoded_paths = [
                np.frombuffer(self._files[p].encode("utf-8"), dtype=np.uint8) for p in positions
            ]
            if self._crop_area is None:
                yield encoded_paths, self._labels[positions]
                continue
            draws = crop_draws(sample_uniforms(seeds, _UNIFORMS_PER_SAMPLE), self._crop_area)
            yield (
                encoded_paths,
                self._labels[positions],
                draws["area_x_ratio"],
                draws["area_per_ratio"],
                draws["position"],
                draws["flip"],
            )


def _pil_decode_problem(path: str) -> str | None:
    """Why PIL cannot decode ``path`` (None when it can): the check behind DALI's failures."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError...
        return f"cannot be decoded ({exc})"
    return None


def _gpu_decoder_args(train: bool, hw_decoder_load: float, preallocate: bool) -> dict[str, Any]:
    """The "mixed" (GPU) decoder's arguments for the training or the validation pipeline."""
    args: dict[str, Any] = {"hw_decoder_load": hw_decoder_load}
    if not train:
        # nvJPEG's default chroma upsampling differs from libjpeg's, which decoded the images of
        # every published ImageNet accuracy (PIL): measure like them.
        args["jpeg_fancy_upsampling"] = True
    elif preallocate:
        # Training decodes every image every epoch: no growth stalls. Validation's few short
        # passes grow their buffers on demand (see the module docstring).
        args.update(
            device_memory_padding=_DEVICE_MEMORY_PADDING,
            host_memory_padding=_HOST_MEMORY_PADDING,
            preallocate_width_hint=_PREALLOCATE_WIDTH_HINT,
            preallocate_height_hint=_PREALLOCATE_HEIGHT_HINT,
        )
    return args


def _log_decoder_buffers(workers: int) -> None:
    gpu_bytes, pinned_bytes = decoder_padding_bytes(workers)
    logging.getLogger("fastkd").info(
        "DALI GPU decoder buffers: %.1f GiB of GPU and %.1f GiB of pinned host memory "
        "(%d threads; data.dali.preallocate=false drops them)",
        gpu_bytes / 2**30,
        pinned_bytes / 2**30,
        max(1, workers),
    )


class DaliLoader(PlannedLoader):
    """Batches ``(images, labels)`` of one split for one rank from a DALI pipeline.

    See `fastkd.data.spec.Loader` for the protocol every loader follows. Decoding runs on the
    GPU ("mixed") when ``data.dali.device`` is gpu, or auto with a CUDA device; else on the CPU.
    ``builds`` counts pipeline constructions: one per run unless a pass is broken off or a bad
    image is met.
    """

    def __init__(self, index: SplitIndex, spec: LoaderSpec) -> None:
        super().__init__(index, spec)
        data = spec.data
        use_gpu = data.dali.device == "gpu" or (
            data.dali.device == "auto" and self.device.type == "cuda"
        )
        if use_gpu and self.device.type != "cuda":
            raise DataError(
                f"data.dali.device=gpu needs a CUDA device, but the batches go to {self.device}: "
                "set data.dali.device=auto or cpu"
            )
        self.backend = "dali-gpu" if use_gpu else "dali-cpu"
        self.on_bad_image = data.on_bad_image
        self.builds = 0
        self._crop_area = (float(data.crop_area[0]), float(data.crop_area[1]))
        self._excluded: set[int] = set()
        self._pipe: Any = None
        self._iterator: DALIGenericIterator | None = None
        self._source: _PlanSource | None = None
        self._pass_open = False
        self._source_offset = 0
        decoder_args = {}
        if use_gpu:
            decoder_args = _gpu_decoder_args(
                self.train, data.dali.hw_decoder_load, data.dali.preallocate
            )
        self._pipeline_kwargs: dict[str, Any] = dict(
            decoder_device="mixed" if use_gpu else "cpu",
            decoder_args=decoder_args,
            image_size=data.image_size,
            mean=[float(v) for v in data.mean],
            std=[float(v) for v in data.std],
            out_dtype=types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT,
            layout="HWC" if spec.channels_last else "CHW",
        )
        if not self.train:
            self._pipeline_kwargs["val_resize"] = data.val_resize
        if use_gpu and self.train and data.dali.preallocate:
            _log_decoder_buffers(data.workers)
        self._runtime_kwargs: dict[str, Any] = dict(
            batch_size=self.batch_size,
            num_threads=max(1, data.workers),
            device_id=self.device.index if use_gpu else None,
            prefetch_queue_depth=data.prefetch,
            # Augmentation draws come from the plan's sample seeds (external_source); this only
            # fixes the seed of anything random DALI might add, never the training crops.
            seed=self.plan.seed,
        )

    # -- pipeline lifetime ---------------------------------------------------------------------

    def _make_pipeline(self, source: _PlanSource) -> Any:
        """The (not yet built) DALI pipeline of this loader, reading from ``source``."""
        make = train_pipeline if self.train else val_pipeline
        return make(source, **self._pipeline_kwargs, **self._runtime_kwargs)

    def _build(self) -> None:
        """(Re)create the pipeline and its iterator; the previous ones are released first."""
        self._release()
        self.builds += 1
        crop_area = self._crop_area if self.train else None
        self._source = _PlanSource(self.index.files, self.index.labels, crop_area)
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

    def _planned_batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """This pass's (positions, sample seeds) batches: the epoch's from ``start_batch`` on,
        with files found bad at run time replaced (train: the slot keeps its seed) or left out
        (val). Seeds are cut with the positions, so a batch keeps its crops wherever a pass
        starts."""
        batches = list(
            zip(self.plan.batches(self.epoch), self.plan.seed_batches(self.epoch), strict=True)
        )[self.start_batch :]
        if not self._excluded:
            return batches
        if not self.train:
            kept = [
                (batch[keep], seeds[keep])
                for batch, seeds in batches
                for keep in [~np.isin(batch, list(self._excluded))]
            ]
            return [(batch, seeds) for batch, seeds in kept if len(batch)]
        total = len(self.index)
        if len(self._excluded) >= total:
            raise DataError(f"{self.index.root}: every image was skipped as undecodable")
        replaced = []
        for batch, seeds in batches:
            batch = batch.copy()
            for i, position in enumerate(batch):
                while position in self._excluded:
                    position = (position + 1) % total
                batch[i] = position
            replaced.append((batch, seeds))
        return replaced

    # -- iteration ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Batch counts below are the pass's (from start_batch on), never the epoch's.
        batches = self._planned_batches()
        if not batches:
            # Nothing to read (a pass started at the epoch's end, or a validation rank with no
            # image): the pipeline is left as it is, ready for the next pass.
            return
        if self._iterator is None or self._pass_open:
            # A pass broken off early leaves batches queued in the pipeline: start afresh.
            self._build()
        assert self._source is not None and self._iterator is not None
        self._source.set_batches(batches)
        self._source_offset = 0  # index in `batches` of the source's first batch
        self._pass_open = True
        iter(self._iterator)  # after a finished pass, resets the pipeline for the next one
        delivered = 0
        while delivered < len(batches):
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
            if delivered == len(batches):
                # Take the pass's end now: a consumer that stops after the last planned batch
                # (the trainer takes exactly pass_batches) leaves the pipeline ready for reuse.
                self._end_pass()
            yield self._to_torch(outputs[0])
        self._pass_open = False

    def _end_pass(self) -> None:
        assert self._iterator is not None
        try:
            next(self._iterator)
        except StopIteration:
            self._pass_open = False
            return
        raise RuntimeError("the DALI pipeline delivered more batches than planned")

    def _to_torch(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images = outputs["images"]
        if self.channels_last:  # NHWC -> NCHW by strides only: channels_last memory, no copy
            images = images.permute(0, 3, 1, 2)
        if images.device != self.device:  # CPU pipeline feeding a GPU
            images = images.to(self.device, non_blocking=True)
        labels = outputs["labels"].to(self.device, torch.int64, non_blocking=True).view(-1)
        return images, labels

    def _recover(self, exc: RuntimeError, delivered: int) -> bool:
        """Handle a pipeline failure: False if no bad file explains it, else raise or rebuild.

        ``delivered`` counts the batches of this pass delivered so far (from ``start_batch``).
        """
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
