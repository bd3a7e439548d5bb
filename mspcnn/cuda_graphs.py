"""The training passes of an iteration replayed from CUDA graphs (``solve(cuda_graphs=True)``,
``tools/train.py --cuda-graphs``; GPU only, never the default).

Why: on a GPU, an MSP-CNN iteration at [1]'s batch is bound by the host. Python issues about 1,400
kernel launches an iteration, and the GPU waits for them. A CUDA graph records the launches of one
forward and backward pass once and replays them with one call.

How, in the order the engine uses it:

1. The first iterations are ordinary eager ones. The last of them, ``warmup`` - 1, runs on the
   capture stream, so that the libraries (cuDNN, cuBLAS) have made their choices and workspaces
   for that stream before a capture.
2. The first replayed iteration starts with no gradients (the solver sets them to None). Graph A
   records the forward and backward of one pass; its backward creates the gradient tensors. Graph B
   (with ``iter_size`` > 1) records the same pass once the gradients exist, so its backward adds to
   them. Nothing runs during a capture.
3. Every later pass copies its batch (and its dropout mask) into the graphs' fixed input tensors
   and replays A for the first pass of an iteration and B for the others. A's replay overwrites the
   gradients, so the solver no longer clears them (``SGDSolver.step(clear_gradients=False)``).

The arithmetic is that of the eager passes (the same kernels on the same values). The dropout masks
come from the same draws of PyTorch's CPU generator: :func:`mspcnn.caffe.layers.draw_dropout_mask`
is what the layer itself calls. What a graph cannot hold, and so what the model must not do in a
training pass: read a device value on the host, copy from ordinary (pageable) host memory, or take
a different Python branch from one pass to the next. If a capture fails, the error is logged and
training goes on eagerly (:attr:`CapturedPasses.failed`).
"""
import contextlib

import torch

from mspcnn.caffe.layers import draw_dropout_mask

__all__ = ["CapturedPasses"]


class CapturedPasses:
    """Args:
        model: the MSPCNN being trained (on a CUDA device, in training mode).
        iter_size: passes per iteration (graph B is captured only when it is above 1).
        first_iteration: the solver's iteration when training starts (or resumes).
        warmup: eager iterations before the capture (at least 1; the last one on the capture stream).
        prepare: a function applied to the image inputs inside the graph (e.g. to channels-last).
    """

    def __init__(self, model, iter_size, first_iteration, warmup=2, prepare=None):
        if warmup < 1:
            raise ValueError(f"CapturedPasses: warmup must be at least 1 eager iteration, got {warmup}")
        self.model, self.iter_size = model, max(1, int(iter_size))
        self.capture_at = first_iteration + warmup
        self.prepare = prepare or (lambda x: x)
        self.stream = torch.cuda.Stream()
        self.graphs, self.outputs, self.inputs, self.mask = [], [], None, None
        self.failed = None  # the error of a failed capture: the passes then stay eager

    @property
    def captured(self):
        return bool(self.graphs)

    def replays(self, iteration):
        """Whether ``iteration``'s passes are (to be) replayed from the graphs."""
        return self.failed is None and iteration >= self.capture_at

    @contextlib.contextmanager
    def iteration(self, iteration):
        """The context of a whole iteration (passes and update): the capture stream for the last eager
        iteration before the capture, the current stream otherwise."""
        if self.failed is not None or iteration != self.capture_at - 1:
            yield
            return
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    def step(self, solver, forward_backward, reduce_gradients=None):
        """One solver iteration (``solver.step``) in the right context: on the capture stream before
        the capture, and without clearing the gradients once the graphs write them."""
        with self.iteration(solver.iter):
            return solver.step(forward_backward, reduce_gradients, clear_gradients=not self.captured)

    def losses(self, k, iteration, host, eager, log=None):
        """Pass k of ``iteration`` on the host batch ``host``: replayed from the graphs when it is their
        turn (captured first if need be), else (and after a failed capture) ``eager(host)``, which runs
        the pass and returns the model's losses."""
        out = self.run(k, host, log) if self.replays(iteration) else None
        return eager(host) if out is None else out

    def _capture(self, host):
        device = next(self.model.parameters()).device
        self.inputs = {k: torch.empty(v.shape, dtype=v.dtype, device=device) for k, v in host.items()}
        backbone = self.model.backbone
        self.mask = None  # dropout's keep-mask of the anchors' fc7 outputs, when the net has dropout
        if backbone.dropout_ratio and backbone.num_classes:
            self.mask = torch.empty((len(host["data"]), backbone.m("fc7").out_features), device=device)
        pool = None
        for _ in range(min(self.iter_size, 2)):
            graph = torch.cuda.CUDAGraph()
            # thread_local: the loader's threads may allocate page-locked memory meanwhile (CUDA calls
            # that the default, global mode forbids to every thread during a capture)
            with torch.cuda.graph(graph, pool=pool, stream=self.stream, capture_error_mode="thread_local"):
                losses = self.model(self.prepare(self.inputs["data"]), self.prepare(self.inputs["data_p"]),
                                    self.inputs["label"], self.inputs["sim"], dropout_mask=self.mask)
                losses["total"].backward()
            pool = graph.pool()
            self.graphs.append(graph)
            self.outputs.append({k: v.detach() for k, v in losses.items()})

    def run(self, k, host, log=None):
        """Pass k of the iteration on the (page-locked) host batch ``host``: its loss terms, as the
        model returns them (tensors on the device, valid until the next replay of the same graph).
        Returns None when the capture failed (``failed`` says why): run the pass eagerly."""
        if not self.graphs:
            try:
                self._capture(host)
            except RuntimeError as exc:  # CUDA's errors too (torch.AcceleratorError is a RuntimeError)
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                self.graphs, self.outputs = [], []
                for p in self.model.parameters():
                    p.grad = None  # a failed capture may have left gradients that hold nothing
                torch.cuda.synchronize()
                if log is not None:
                    log("solver.cpp:228", f"CUDA graphs: the capture failed ({self.failed}); "
                        "training goes on without them")
                return None
        for key, tensor in host.items():
            self.inputs[key].copy_(tensor, non_blocking=True)
        if self.mask is not None:
            # converted on the host, so that the copy is a plain page-locked one (a copy that also
            # converts would go through ordinary memory and wait for the GPU)
            mask = draw_dropout_mask(self.mask.shape, self.model.backbone.dropout_ratio)
            self.mask.copy_(mask.to(self.mask.dtype).pin_memory(), non_blocking=True)
        graph = min(k, len(self.graphs) - 1)
        self.graphs[graph].replay()
        return self.outputs[graph]
