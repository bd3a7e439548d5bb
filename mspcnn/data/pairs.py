"""Pairs for the Siamese net: every positive pair comes with two negative
pairs (docs/method.md, section 4), anchors cover the training set each epoch, and
batches are decoded and transformed by background threads ahead of use.

* :class:`PairSampler`: per epoch, a seeded permutation of all training images
  as anchors; one third of them (drawn among images whose identity has another
  image) get a positive partner (same identity, another camera when there is
  one), the others a negative partner (another identity).
* :class:`PairLoader`: batches {data, data_p, label, sim} from a DatumDB, a
  DataTransformer and a PairSampler, prefetched in a deterministic order by
  threads (LMDB reads, PNG decoding and numpy release the interpreter lock for
  part of the work, so threads scale to about 2) or by worker processes, which
  write each batch into shared memory and scale with cores.
"""
import contextlib
import copy
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor

import numpy as np
import torch

from mspcnn.data.lmdb_io import forget_inherited_environments

__all__ = ["PairSampler", "PairLoader", "LoaderError"]


class LoaderError(RuntimeError):
    """The loader's worker processes failed (one died, or shared memory could not be made)."""


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
        workers: background workers; prefetch: batches decoded ahead (default twice the
            workers, at least 4: each batch is one worker's job, so fewer batches in flight than
            workers would leave workers idle).
        kind: "threads", "processes" or "auto" (the default: threads up to 2 workers, processes
            beyond). Threads share the interpreter lock and stop scaling at about 2. Processes are
            forked once, when the first batch is asked for, and kept until :meth:`close`; each writes
            its batches into a slot of shared memory, which a thread of this process copies out.
            Batches are the same, bit for bit, whatever the kind and the worker count.
        pin_memory: make each batch in page-locked memory (in the worker threads), so that a copy
            to a GPU with ``non_blocking=True`` runs while the GPU computes; from ordinary memory
            the copy first waits for the GPU's queued work. Needs a CUDA-enabled PyTorch.
    Yields dicts of torch tensors: data, data_p (N x C x h x w float32),
    label (the anchors' labels), sim (1 positive, 0 negative)."""

    def __init__(self, db, labels, sampler, batch_pairs, transformer, workers=2, prefetch=None, pin_memory=False,
                 kind="auto"):
        if kind not in ("auto", "threads", "processes"):
            raise ValueError(f"PairLoader: kind must be 'auto', 'threads' or 'processes', got {kind!r}")
        if kind == "processes" and "fork" not in multiprocessing.get_all_start_methods():
            raise ValueError("PairLoader: worker processes need the 'fork' start method (Linux, macOS); "
                             "use kind='threads'")
        if len(db) != len(sampler):
            raise ValueError(f"PairLoader: the database has {len(db)} records, the sampler "
                             f"{len(sampler)} labels")
        self.db, self.labels = db, np.asarray(labels, np.int64)
        self.sampler, self.batch_pairs = sampler, batch_pairs
        self.transformer = transformer
        self.workers = max(1, workers)
        self.prefetch = self.default_prefetch(self.workers) if prefetch is None else max(1, prefetch)
        self.pin_memory = bool(pin_memory)
        if kind == "auto":
            kind = "processes" if self.workers > 2 and "fork" in multiprocessing.get_all_start_methods() else "threads"
        self.kind = kind
        self._procs = None  # (ProcessPoolExecutor, slots, finalizer) once started
        self._running = False  # a generator is using the slots

    @staticmethod
    def default_prefetch(workers):
        """Batches decoded ahead by default: twice the workers, at least 4."""
        return max(4, 2 * max(1, workers))

    def batches_per_epoch(self):
        return len(self.sampler) // self.batch_pairs

    def _make(self, anchors, partners, sim, seed):
        data = _transformed(self.db, self.transformer, np.concatenate([anchors, partners]), seed)
        return self._batch(torch.from_numpy(data), anchors, sim)

    def _batch(self, data, anchors, sim):
        """The batch dict of the transformed images ``data`` (anchors, then partners), page-locked
        when asked (a tensor already page-locked is kept as it is)."""
        n = len(anchors)
        batch = {"data": data[:n], "data_p": data[n:],
                 "label": torch.from_numpy(self.labels[anchors].astype(np.float32)),
                 "sim": torch.from_numpy(sim)}
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    def _jobs(self, e, start, select, one_epoch):
        """The batches of epoch e from batch ``start`` (then of e + 1, ... unless ``one_epoch``), as
        (epoch, index, anchors, partners, sim, seed), made lazily. ``select(e)`` picks epoch e's."""
        nb, bp = self.batches_per_epoch(), self.batch_pairs
        while True:
            anchors, partners, sim = self.sampler.epoch(e)
            pick = select(e) if select is not None else None
            for k in range(start, nb):
                if pick is None or pick(k):
                    yield (e, k, anchors[k * bp:(k + 1) * bp], partners[k * bp:(k + 1) * bp],
                           sim[k * bp:(k + 1) * bp], (self.sampler.seed + e) * 1_000_003 + k)
            if one_epoch:
                return
            e, start = e + 1, 0

    def epoch(self, e, start=0, select=None):
        """Generator of the batches of epoch e (the last incomplete batch is dropped), from batch
        ``start``, as (index in the epoch, batch). ``select(k)``, when given, picks the batches to
        make: the others are skipped without reading a single image (a data-parallel worker makes
        only its share)."""
        picker = None if select is None else (lambda _: select)
        for _, k, batch in self._run(self._jobs(e, start, picker, one_epoch=True)):
            yield k, batch

    def stream(self, e=0, start=0, select=None):
        """Endless generator of (epoch, index in the epoch, batch) from batch ``start`` of epoch e,
        without a pause between epochs (the next epoch's first batches are made while this one's
        last are used). ``select(e)``, when given, returns the picker of epoch e's batches (see
        :meth:`epoch`)."""
        return self._run(self._jobs(e, start, select, one_epoch=False))

    def _run(self, jobs):
        """Make the batches of ``jobs`` ahead, ``prefetch`` of them at a time, and yield them in order.
        With processes, job i writes into slot i % prefetch: the job that takes a slot over is
        submitted only after the batch that held it was copied out."""
        processes = self.kind == "processes"
        if processes:
            if self._running:
                raise RuntimeError("PairLoader: with worker processes, one epoch or stream at a time (they share "
                                   "the shared-memory slots); close the other generator first, or use kind='threads'")
            self._start_processes()
            self._running = True
        pending = []
        with contextlib.ExitStack() as stack:
            if processes:
                stack.callback(setattr, self, "_running", False)
            pool = stack.enter_context(ThreadPoolExecutor(self.workers, initializer=_block_signals))

            def submit(i, job):
                e, k, anchors, partners, sim, seed = job
                if processes:
                    fut = pool.submit(self._make_in_process, i % self.prefetch, anchors, partners, sim, seed)
                else:
                    fut = pool.submit(self._make, anchors, partners, sim, seed)
                pending.append((e, k, fut))

            try:
                numbered = enumerate(jobs)
                for i, job in numbered:
                    submit(i, job)
                    if len(pending) == self.prefetch:
                        break
                while pending:
                    e, k, fut = pending.pop(0)
                    batch = fut.result()
                    nxt = next(numbered, None)
                    if nxt is not None:
                        submit(*nxt)
                    yield e, k, batch
            finally:
                for _, _, fut in pending:
                    fut.cancel()

    # Worker processes ------------------------------------------------------------------------
    def _start_processes(self):
        """Fork the worker processes and make the shared slots (once; kept until close())."""
        if self._procs is not None:
            return
        c, height, width = np.shape(self.db[0][0])
        ch, cw = self.transformer.crop or (height, width)
        shape = (self.prefetch, 2 * self.batch_pairs, c, ch, cw)
        need = int(np.prod(shape)) * 4
        folder = _shared_folder(need)
        try:
            path = os.path.join(folder, "slots")
            slots = np.lib.format.open_memmap(path, "w+", np.float32, shape)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise LoaderError(f"PairLoader: cannot make {need / 2**20:.0f} MiB of shared memory for "
                              f"{self.prefetch} batches in {folder}: {exc}") from None
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_worker_init, initargs=(self.db, self.transformer, path))
        finalizer = weakref.finalize(self, _release, pool, folder)
        self._procs = (pool, slots, finalizer)
        try:
            with _signals_blocked():  # the pool's manager thread (started now) inherits the mask
                started = pool.submit(os.getpid)  # forks them all now, from this thread
            started.result()
        except BrokenProcessPool as exc:
            self.close()
            raise LoaderError(f"PairLoader: the worker processes could not start ({exc})") from None

    def _make_in_process(self, slot, anchors, partners, sim, seed):
        pool, slots = self._procs[0], self._procs[1]
        try:
            pool.submit(_worker_fill, slot, np.concatenate([anchors, partners]), seed).result()
        except BrokenProcessPool:
            raise LoaderError("PairLoader: a worker process died (killed, out of memory, or a crash in "
                              "reading or decoding); its pool is gone, so the batches in flight are lost too. "
                              "Resume from the last snapshot, or use kind='threads' to see the failing "
                              "record's error") from None
        data = torch.empty(slots.shape[1:], dtype=torch.float32, pin_memory=self.pin_memory)
        data.copy_(torch.from_numpy(slots[slot]))
        return self._batch(data, anchors, sim)

    def close(self):
        """Stop the worker processes and free their shared memory (threads need nothing)."""
        if self._procs is not None:
            self._procs[2]()
            self._procs = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Asynchronous signals that Python handles in its main thread (SIGINT: KeyboardInterrupt; the
# engine's SIGINT / SIGHUP / SIGTERM snapshots). The kernel hands a signal sent to the process to
# any thread that does not block it; when a helper thread takes it, Python's handler only marks it,
# and a main thread blocked in a sleep or a wait is not woken until that call returns by itself.
_ASYNC_SIGNALS = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1",
                                                "SIGUSR2", "SIGALRM") if hasattr(signal, n)}


def _block_signals():
    """Block the asynchronous signals in this thread (the initializer of helper threads: leave them to
    the main thread). Returns the previous mask, or None where threads have no signal masks."""
    if hasattr(signal, "pthread_sigmask"):
        return signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
    return None


@contextlib.contextmanager
def _signals_blocked():
    """Block the asynchronous signals in this thread for the block's duration, so that the threads
    started meanwhile (which inherit the mask) leave them to the main thread."""
    old = _block_signals()
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _shared_folder(need):
    """A private folder for the slots: in /dev/shm (memory) when it has room, else the temp folder."""
    base = "/dev/shm"
    try:
        st = os.statvfs(base)
        roomy = st.f_bavail * st.f_frsize > 2 * need
    except OSError:
        roomy = False
    return tempfile.mkdtemp(prefix="mspcnn-pairs-", dir=base if roomy else None)


def _release(pool, folder):
    pool.shutdown(wait=True, cancel_futures=True)
    shutil.rmtree(folder, ignore_errors=True)


_WORKER = {}


def _worker_init(db, transformer, path):
    """In a forked worker: its own LMDB environment (an environment must not cross a fork), the
    transformer, and the shared slots. Interrupts and terminations are the parent's to handle (it
    stops the pool, e.g. after a snapshot); a worker whose parent has gone (killed) removes the
    shared slots and exits by itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # forked with the parent's mask while it started the pool
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _ASYNC_SIGNALS)
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)  # the parent (killed) could not
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        pass
    forget_inherited_environments()
    _WORKER["db"] = pickle.loads(pickle.dumps(db))  # a DatumDB reopens its environment here
    _WORKER["transformer"] = transformer
    _WORKER["slots"] = np.load(path, mmap_mode="r+")


def _transformed(db, transformer, records, seed, out=None):
    """The records' images transformed by a private copy of ``transformer`` seeded by the batch:
    reproducible whatever the thread or process that makes it, and no RNG shared between them."""
    images = db.read_list(records)[0]
    transformer = copy.copy(transformer)
    transformer.rng = np.random.default_rng(seed)
    return transformer(images, out=out)


def _worker_fill(slot, records, seed):
    _transformed(_WORKER["db"], _WORKER["transformer"], records, seed, out=_WORKER["slots"][slot])
