"""Pairs for the Siamese net: every positive pair comes with two negative
pairs (docs/method.md, section 4), anchors cover the training set each epoch, and
batches are decoded and transformed by background threads ahead of use.

* :class:`PairSampler`: per epoch, a seeded permutation of all training images
  as anchors; one third of them (drawn among images whose identity has another
  image) get a positive partner (same identity, another camera when there is
  one), the others a negative partner (another identity).
* :class:`PairLoader`: batches {data, data_p, label, sim} from a DatumDB, a
  DataTransformer and a PairSampler, prefetched by a thread pool (LMDB reads,
  JPEG/PNG decoding and numpy release the GIL), in a deterministic order.
"""
import copy
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["PairSampler", "PairLoader"]


class PairSampler:
    """Args:
        labels: identity of every training image (ints).
        cameras: camera of every image (optional; positives prefer another camera).
        seed: the sampler's seed; epoch e uses seed + e, so any epoch is reproducible.
        positive_fraction: share of positive pairs (1/3: two negatives per positive).
    """

    def __init__(self, labels, cameras=None, seed=0, positive_fraction=1 / 3):
        self.labels = np.asarray(labels, np.int64)
        if self.labels.ndim != 1 or len(self.labels) < 2:
            raise ValueError("PairSampler: need at least two labelled images")
        if len(np.unique(self.labels)) < 2:
            raise ValueError("PairSampler: need at least two identities for negative pairs")
        self.cameras = None if cameras is None else np.asarray(cameras)
        self.seed = seed
        self.positive_fraction = positive_fraction
        self.by_id = defaultdict(list)
        for i, lab in enumerate(self.labels):
            self.by_id[int(lab)].append(i)
        self.eligible = np.array([i for i, lab in enumerate(self.labels)
                                  if len(self.by_id[int(lab)]) > 1], np.int64)

    def __len__(self):
        return len(self.labels)

    def epoch(self, e):
        """(anchor, partner, sim) index arrays for epoch e, in training order."""
        rng = np.random.default_rng(self.seed + e)
        n = len(self.labels)
        n_pos = min(int(round(n * self.positive_fraction)), len(self.eligible))
        positive = np.zeros(n, bool)
        positive[rng.choice(self.eligible, n_pos, replace=False)] = True
        anchors = rng.permutation(n)
        partners = np.empty(n, np.int64)
        for k, a in enumerate(anchors):
            lab = int(self.labels[a])
            if positive[a]:
                same = [j for j in self.by_id[lab] if j != a]
                if self.cameras is not None:
                    other_cam = [j for j in same if self.cameras[j] != self.cameras[a]]
                    same = other_cam or same
                partners[k] = same[rng.integers(len(same))]
            else:
                while True:
                    j = int(rng.integers(n))
                    if self.labels[j] != lab:
                        break
                partners[k] = j
        return anchors, partners, positive[anchors].astype(np.float32)


class PairLoader:
    """Iterate over the pair batches of one epoch.

    Args:
        db: a DatumDB of the training images (uint8 C x H x W).
        labels: the training label (0..K-1) of every record of ``db``.
        sampler: a PairSampler over the same records.
        batch_pairs: pairs per batch.
        transformer: a DataTransformer (TRAIN phase: random crops, mirror).
        workers: background threads; prefetch: batches decoded ahead (default twice the
            workers, at least 4: each batch is one thread's job, so fewer batches in flight than
            workers would leave threads idle).
        pin_memory: make each batch in page-locked memory (in the worker threads), so that a copy
            to a GPU with ``non_blocking=True`` runs while the GPU computes; from ordinary memory
            the copy first waits for the GPU's queued work. Needs a CUDA-enabled PyTorch.
    Yields dicts of torch tensors: data, data_p (N x C x h x w float32),
    label (the anchors' labels), sim (1 positive, 0 negative)."""

    def __init__(self, db, labels, sampler, batch_pairs, transformer, workers=2, prefetch=None, pin_memory=False):
        if len(db) != len(sampler):
            raise ValueError(f"PairLoader: the database has {len(db)} records, the sampler "
                             f"{len(sampler)} labels")
        self.db, self.labels = db, np.asarray(labels, np.int64)
        self.sampler, self.batch_pairs = sampler, batch_pairs
        self.transformer = transformer
        self.workers = max(1, workers)
        self.prefetch = self.default_prefetch(self.workers) if prefetch is None else max(1, prefetch)
        self.pin_memory = bool(pin_memory)

    @staticmethod
    def default_prefetch(workers):
        """Batches decoded ahead by default: twice the workers, at least 4."""
        return max(4, 2 * max(1, workers))

    def batches_per_epoch(self):
        return len(self.sampler) // self.batch_pairs

    def _make(self, anchors, partners, sim, seed):
        images = self.db.read_list(np.concatenate([anchors, partners]))[0]
        # A private transformer per batch, seeded by the batch: reproducible
        # whatever the thread that runs it, and no RNG shared between threads.
        transformer = copy.copy(self.transformer)
        transformer.rng = np.random.default_rng(seed)
        data = torch.from_numpy(transformer(images))
        n = len(anchors)
        batch = {"data": data[:n], "data_p": data[n:],
                 "label": torch.from_numpy(self.labels[anchors].astype(np.float32)),
                 "sim": torch.from_numpy(sim)}
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    def epoch(self, e, start=0, select=None):
        """Generator of the batches of epoch e (the last incomplete batch is dropped), from batch
        ``start``, as (index in the epoch, batch). ``select(k)``, when given, picks the batches to
        make: the others are skipped without reading a single image (a data-parallel worker makes
        only its share)."""
        anchors, partners, sim = self.sampler.epoch(e)
        nb, bp = self.batches_per_epoch(), self.batch_pairs
        keep = [k for k in range(start, nb) if select is None or select(k)]
        jobs = [(k, (anchors[k * bp:(k + 1) * bp], partners[k * bp:(k + 1) * bp], sim[k * bp:(k + 1) * bp],
                     (self.sampler.seed + e) * 1_000_003 + k)) for k in keep]
        with ThreadPoolExecutor(self.workers) as pool:
            pending = [pool.submit(self._make, *job) for _, job in jobs[:self.prefetch]]
            for i, (k, _) in enumerate(jobs):
                batch = pending.pop(0).result()
                if i + self.prefetch < len(jobs):
                    pending.append(pool.submit(self._make, *jobs[i + self.prefetch][1]))
                yield k, batch
