"""`glied extract`'s image loading: decoding, and the extractor's resize, in DataLoader worker processes.

    for d in decoded(items, max_side=2000, workers=4, prepare=region_extractor.input_preparer(), pin_memory=True):
        d.item      the InputImage
        d.error     (kind, reason) when glied.datasets.images.decode_image refused the file, else None
        d.loaded()  the LoadedImage (BGR uint8, possibly downscaled to max_side, original size)
        d.prepared  prepare(image, "image 0") -- e.g. the detector's resized input tensor -- or None
        d.rejected  the InputError message of a prepare that refused the image, else None

Items come back in the order given. ``workers`` = 0: everything in this process. ``workers`` > 0: a
``torch.utils.data.DataLoader`` with that many worker processes (no GIL between decoding and the model); the
decoded images travel through shared memory, and with ``pin_memory`` (a CUDA device) the prepared tensors are
copied into pinned memory by the DataLoader, so that ``.to(device, non_blocking=True)`` overlaps the copy with
the GPU's work. ``prepare`` must be picklable (a module-level function or a ``functools.partial`` of one).

Workers are started the platform's default way (fork on Linux: cheap, and no re-import of the caller's
``__main__``, which a fork server or spawn would need guarded). They run only Pillow, NumPy, OpenCV and
``torch.from_numpy``, never CUDA. Do not change OpenCV's thread count inside a forked worker:
``cv2.setNumThreads`` there waits forever on the parent's thread pool (seen here; a plain ``cv2.resize`` in the
worker is fine).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from glied.datasets.images import ImageLoadError, LoadedImage, decode_image
from glied.datasets.inputs import InputImage
from glied.errors import InputError


@dataclass
class Decoded:
    item: InputImage
    image: object = None            # BGR uint8 (h, w, 3): numpy, or a torch tensor when it crossed processes
    orig_w: int = 0
    orig_h: int = 0
    prepared: object = None
    error: tuple | None = None      # (kind, reason) of an ImageLoadError
    rejected: str | None = None

    def loaded(self) -> LoadedImage:
        im = self.image if isinstance(self.image, np.ndarray) else self.image.numpy()   # (h, w, 3) uint8
        return LoadedImage(image=im, orig_w=self.orig_w, orig_h=self.orig_h)

    def as_torch(self) -> "Decoded":
        """Arrays that crossed the process boundary as NumPy (see :func:`_shared`) back into tensors."""
        if self.prepared is not None:
            self.prepared = tuple(_tensor(x) for x in self.prepared)
        return self

    def pin_memory(self) -> "Decoded":
        """Called by the DataLoader's pinning thread: pin the prepared tensors only (the model's input goes to
        the GPU; the decoded image stays on the CPU for the word extractor and the cache)."""
        from torch.utils.data._utils.pin_memory import pin_memory

        self.as_torch()
        if self.prepared is not None:
            self.prepared = pin_memory(self.prepared)
        return self


def _tensor(x):
    if isinstance(x, np.ndarray):
        import torch
        return torch.from_numpy(x)
    return x


def _shared(x):
    """In a worker: a tensor moved to shared memory (handed to the main process without a copy through the
    pipe), or -- when shared memory is full or too small (a container's 64 MB /dev/shm, a file-size limit) --
    the NumPy array, which is pickled through the pipe instead. A tensor the queue fails to share later would be
    dropped silently and the main process would wait for it forever."""
    import torch

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        return x
    try:
        return x.share_memory_()
    except (RuntimeError, OSError):
        return x.numpy()


class _Images:
    """Map-style dataset: item k -> :class:`Decoded` (never raises for a bad file: the error is a value)."""

    def __init__(self, items: list, max_side, prepare, in_worker: bool):
        self.items, self.max_side, self.prepare, self.in_worker = items, max_side, prepare, in_worker

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> Decoded:
        it = self.items[k]
        try:
            li = decode_image(it.path, max_side=self.max_side)
        except ImageLoadError as e:        # sent back as a value: exceptions with extra fields do not unpickle
            return Decoded(it, error=(e.kind, e.reason))
        d = Decoded(it, li.image, li.orig_w, li.orig_h)
        if self.prepare is not None:
            try:
                d.prepared = self.prepare(li.image, "image 0")
            except InputError as e:
                d.rejected = str(e).splitlines()[0]
        if self.in_worker:                 # tensors cross processes through shared memory, arrays are pickled
            d.image = _shared(d.image)
            if d.prepared is not None:
                d.prepared = tuple(_shared(x) for x in d.prepared)
        return d


def _same(d):
    return d


def decoded(items: list[InputImage], *, max_side, workers: int, prepare: Callable | None = None,
            pin_memory: bool = False, ahead: int = 8) -> Iterator[Decoded]:
    """One :class:`Decoded` per item, in order (see the module docstring); ``ahead``: items decoded in advance
    (at least 2 per worker)."""
    ds = _Images(items, max_side, prepare, in_worker=workers > 0)
    if workers == 0 or not items:
        for k in range(len(ds)):
            yield ds[k]
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=min(workers, len(items)),
                        collate_fn=_same, pin_memory=pin_memory,
                        prefetch_factor=max(2, -(-ahead // min(workers, len(items)))))
    it = iter(loader)
    try:
        for d in it:
            yield d.as_torch()
    finally:
        del it                             # shuts the worker processes down
