"""`glied extract` under torchrun: one shard per process, each into its own cache, merged at the end.

    torchrun --nproc_per_node N -m glied extract INPUT --out CACHE [...]

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. With WORLD_SIZE > 1:

1. rank 0 opens CACHE with a :class:`CacheWriter` (creates it, or checks that an existing CACHE has the same
   feature identity and repairs a torn tail) and closes it; a refusal reaches every rank as the same one line;
2. rank K extracts shard K/N (:func:`glied.datasets.inputs.shard`) into ``CACHE/ranks/rank-K-of-N``, an
   ordinary feature cache with the usual crash safety and resume, skipping the ids already in CACHE;
3. a barrier (gloo on CPU; NCCL on CUDA, where rank K runs on ``cuda:LOCAL_RANK``) waits for every rank;
4. rank 0 copies every rank cache under ``CACHE/ranks/`` into CACHE with
   :func:`glied.pipeline.features_io.merge_caches` (duplicates skipped, so a merge can be re-run), writes the
   ranks' failures into ``CACHE/failures.jsonl``, then removes ``CACHE/ranks`` (renamed away first, so a
   crash mid-removal never leaves a half-deleted cache that a later run would open).

After a crash (any rank, any moment), running the same command again resumes: the rank caches keep what
they committed, CACHE keeps what was merged, and each rank extracts only the ids in neither. The rank caches
of an earlier run with another N are merged as well. The result equals a single-process extraction.
"""
from __future__ import annotations

import os
import shutil
import sys
from datetime import timedelta

from glied.datasets.cache import FAILURES, MANIFEST, CacheWriter, FeatureCache
from glied.errors import ConfigError, GliedError
from glied.fileio import atomic_open
from glied.pipeline.extract import ExtractSummary, cache_manifest, extract
from glied.pipeline.features_io import merge_caches

RANKS_DIR = "ranks"
_MERGED_DIR = ".ranks-merged"           # CACHE/ranks renamed after a merge, then deleted
# a rank that finishes its shard waits at the barrier for the slowest one; the default 30 minutes is far too
# short for a long extraction (a crashed rank makes torchrun stop the others, so nothing waits forever)
BARRIER_TIMEOUT = timedelta(days=7)


def distributed_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when running under torchrun with WORLD_SIZE > 1, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


def rank_device(device: str, local_rank: int) -> str:
    """The device of one rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process); an explicit
    ``cuda:N`` or ``cpu`` is kept."""
    return f"cuda:{local_rank}" if device == "cuda" else device


def rank_cache(out: str, rank: int, world: int) -> str:
    return os.path.join(out, RANKS_DIR, f"rank-{rank}-of-{world}")


def _init_group(device: str):
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist, False
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl", timeout=BARRIER_TIMEOUT, device_id=torch.device(device))
    else:
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return dist, True


def _merge(out: str, log) -> tuple[int, int]:
    """Rank 0, after the barrier: every rank cache under OUT/ranks -> OUT; failures -> OUT/failures.jsonl."""
    ranks = os.path.join(out, RANKS_DIR)
    parts = sorted(os.path.join(ranks, d) for d in os.listdir(ranks)
                   if os.path.isfile(os.path.join(ranks, d, MANIFEST)))
    n = dup = 0
    if parts:
        n, dup = merge_caches(out, parts)
    with atomic_open(os.path.join(out, FAILURES), "w", encoding="utf-8") as f:
        for p in parts:
            try:
                with open(os.path.join(p, FAILURES), encoding="utf-8") as g:
                    shutil.copyfileobj(g, f)
            except FileNotFoundError:
                pass
    gone = os.path.join(out, _MERGED_DIR)
    os.replace(ranks, gone)          # one atomic step: CACHE/ranks is either all there or not at all
    shutil.rmtree(gone)
    log(f"merged {n} entries of {len(parts)} rank caches into {out}"
        + (f" ({dup} already there)" if dup else ""))
    return n, dup


def extract_ranks(input_path: str, out: str, *, region_extractor, attribute_extractor=None,
                  top_k: int | None = None, dtype: str = "float16", max_side=None, boxes=None,
                  device: str = "cpu", progress: bool = True, log=None, **kwargs) -> ExtractSummary:
    """:func:`glied.pipeline.extract.extract` of this rank's shard into its rank cache, then (rank 0) the
    merge into ``out``; see the module docstring. Every rank returns the summary summed over all ranks
    (``failures_path``: ``out``'s). ``kwargs`` go to :func:`extract` (batch size, workers, ...; not
    ``shard``). Raises ConfigError when ``out`` holds another extractor identity (on every rank)."""
    env = distributed_env()
    if env is None:
        raise ConfigError("extract_ranks needs torchrun's WORLD_SIZE > 1; use glied.pipeline.extract.extract")
    rank, world, _ = env
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    dist, created = _init_group(device)
    try:
        problem: list = [None]
        err = None
        if rank == 0:
            try:
                stale = os.path.join(out, _MERGED_DIR)
                if os.path.isdir(stale):            # a crash after a merge, while the rank caches were removed
                    shutil.rmtree(stale)
                manifest = cache_manifest(region_extractor, attribute_extractor, top_k=top_k, max_side=max_side,
                                          boxes_given=boxes is not None, dtype=dtype)
                CacheWriter(out, manifest).close()  # creates OUT, or checks its identity and repairs it
            except GliedError as e:
                err, problem = e, [str(e)]
        dist.broadcast_object_list(problem, src=0)
        if err is not None:
            raise err
        if problem[0] is not None:
            raise ConfigError(problem[0])
        done = set(FeatureCache.open(out).ids())
        s = extract(input_path, rank_cache(out, rank, world), region_extractor=region_extractor,
                    attribute_extractor=attribute_extractor, top_k=top_k, dtype=dtype, shard=(rank, world),
                    exclude=done, max_side=max_side, boxes=boxes, progress=progress and rank == 0,
                    log=log, **kwargs)           # every rank reports its own bad files and repairs
        sums = [None] * world
        dist.all_gather_object(sums, (s.total, s.already, s.extracted, s.failed, s.seconds))
        if rank == 0:
            _merge(out, log)
        dist.barrier()                              # every rank returns after the merge
        total, already, extracted, failed = (sum(x[i] for x in sums) for i in range(4))
        return ExtractSummary(total=total, already=already, extracted=extracted, failed=failed,
                              seconds=max(x[4] for x in sums), failures_path=os.path.join(out, FAILURES))
    finally:
        if created:
            dist.destroy_process_group()
