"""Caffe's SGD solver (src/caffe/solvers/sgd_solver.cpp, solver.cpp), exactly.

One iteration: ``iter_size`` forward/backward passes accumulate the diffs;
then, with the rate of the current iteration (counted before the increment):
clip the accumulated diffs by their global L2 norm (``clip_gradients`` >= 0);
per parameter, diff /= iter_size, diff += weight_decay * decay_mult * w (L2;
L1 adds the sign), history = momentum * history + rate * lr_mult * diff,
w -= history; then iter += 1. ``torch.optim.SGD`` differs (it applies the rate
after the momentum sum), so the update is written out here.

Learning-rate policies: fixed, step, exp, inv, multistep, poly, sigmoid, and
``stepdecr`` (base * (1 - gamma * floor(iter / stepsize)), floored at
``min_lr``) of the Caffe fork of Xiao et al. Rates are computed as Caffe
does: float32 operands, ``pow`` and the product in double, the result stored
as float32 (this reproduces Caffe's rates bit for bit).

Snapshots: ``<prefix>_iter_<N>.caffemodel`` (weights) and
``<prefix>_iter_<N>.solverstate`` (a Caffe SolverState: iteration, history
blobs, current step, and -- our field 1001 -- the random states of torch,
numpy and the caller), each written to a temporary file and renamed, so a
crash mid-snapshot leaves the previous snapshot intact.
"""
import io as _io
import math
import os
import pickle

import numpy as np
import torch

from mspcnn.caffe import io as cio
from mspcnn.caffe import proto

__all__ = ["learning_rate", "SGDSolver", "KNOWN_POLICIES"]

KNOWN_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid", "stepdecr")
f32 = np.float32


def learning_rate(sp, it, current_step=0):
    """The rate Caffe's GetLearningRate returns at iteration ``it`` (float32).
    ``current_step`` is the multistep counter; returns (rate, current_step)."""
    policy = sp.lr_policy
    base, gamma, power = float(f32(sp.base_lr)), f32(sp.gamma), f32(sp.power)
    if policy == "fixed":
        rate = base
    elif policy == "step":
        if sp.stepsize <= 0:
            raise ValueError("lr_policy step needs stepsize > 0")
        rate = base * math.pow(gamma, it // sp.stepsize)
    elif policy == "exp":
        rate = base * math.pow(gamma, it)
    elif policy == "inv":
        rate = base * math.pow(f32(1) + gamma * f32(it), -power)
    elif policy == "multistep":
        while current_step < len(sp.stepvalue) and it >= sp.stepvalue[current_step]:
            current_step += 1
        rate = base * math.pow(gamma, current_step)
    elif policy == "poly":
        if sp.max_iter <= 0:
            raise ValueError("lr_policy poly needs max_iter > 0")
        rate = base * math.pow(f32(1) - f32(it) / f32(sp.max_iter), power)
    elif policy == "sigmoid":
        rate = base * (1.0 / (1.0 + math.exp(-gamma * (f32(it) - f32(sp.stepsize)))))
    elif policy == "stepdecr":
        if sp.stepsize <= 0:
            raise ValueError("lr_policy stepdecr needs stepsize > 0")
        rate = max(base * (1.0 - float(gamma) * (it // sp.stepsize)), float(f32(sp.min_lr)))
    else:
        raise ValueError(f"unknown lr_policy {policy!r}; known: {', '.join(KNOWN_POLICIES)}")
    return f32(rate), current_step


class SGDSolver:
    """Args:
        param: a SolverParameter (or the path of a solver prototxt).
        params: the learnable parameters: tensors, or dicts {"params": [p],
            "lr_mult": m, "decay_mult": d, "name": s} (e.g. model.param_groups()).
            A tensor's own ``lr_mult``/``decay_mult`` attributes are used when set.
        layer_blobs: callable -> {layer: [tensors]} for .caffemodel snapshots.
    """

    def __init__(self, param, params, layer_blobs=None, prototxt_template=None):
        if isinstance(param, (str, os.PathLike)):
            param = cio.read_prototxt(param, proto.SolverParameter)
        self.param = param
        if param.type not in ("SGD", ""):
            raise ValueError(f"solver type {param.type!r}: only SGD is implemented")
        if param.regularization_type not in ("L1", "L2"):
            raise ValueError(f"regularization_type must be L1 or L2, got {param.regularization_type!r}")
        learning_rate(param, 0)  # validate the policy now
        self.entries = []
        seen = set()
        for item in params:
            group = item if isinstance(item, dict) else {"params": [item]}
            for p in group["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                self.entries.append({
                    "param": p,
                    "lr_mult": float(group.get("lr_mult", getattr(p, "lr_mult", 1.0))),
                    "decay_mult": float(group.get("decay_mult", getattr(p, "decay_mult", 1.0))),
                    "history": torch.zeros_like(p, memory_format=torch.contiguous_format),
                })
        self.iter = 0
        self.current_step = 0
        self.layer_blobs = layer_blobs
        self.prototxt_template = prototxt_template

    # ----------------------------------------------------------------- update
    def rate(self):
        return learning_rate(self.param, self.iter, self.current_step)[0]

    def zero_grad(self):
        for e in self.entries:
            e["param"].grad = None

    def step(self, forward_backward):
        """One Caffe iteration. ``forward_backward(k)`` runs sub-iteration k
        (0 .. iter_size-1): a forward pass and ``loss.backward()``; it returns
        the loss value. Returns the mean loss over the sub-iterations."""
        self.zero_grad()
        iter_size = max(1, int(self.param.iter_size))
        losses = [float(forward_backward(k)) for k in range(iter_size)]
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step)
        self.apply_update(float(rate))
        self.iter += 1
        return sum(losses) / iter_size

    @torch.no_grad()
    def apply_update(self, rate):
        sp = self.param
        grads = [e["param"].grad if e["param"].grad is not None else torch.zeros_like(e["param"])
                 for e in self.entries]
        if sp.clip_gradients >= 0:
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
            if norm > sp.clip_gradients:
                scale = sp.clip_gradients / norm
                grads = [g * scale for g in grads]
        iter_size = max(1, int(sp.iter_size))
        momentum, decay = f32(sp.momentum), f32(sp.weight_decay)
        for e, g in zip(self.entries, grads):
            p = e["param"]
            diff = g / iter_size if iter_size > 1 else g.clone()
            local_decay = float(decay * f32(e["decay_mult"]))
            if local_decay:
                diff += local_decay * (p if sp.regularization_type == "L2" else torch.sign(p))
            local_rate = float(f32(rate) * f32(e["lr_mult"]))
            e["history"].mul_(float(momentum)).add_(diff, alpha=local_rate)
            p.sub_(e["history"])

    # -------------------------------------------------------------- snapshots
    def snapshot(self, prefix=None, extra_state=None):
        """Write <prefix>_iter_<N>.caffemodel and .solverstate; returns their paths."""
        prefix = prefix or self.param.snapshot_prefix or "snapshot"
        base = f"{prefix}_iter_{self.iter}"
        weights = base + ".caffemodel"
        if self.layer_blobs is None:
            raise ValueError("SGDSolver.snapshot: no layer_blobs given, cannot write weights")
        from mspcnn.caffe.weights import layer_blobs_to_net

        template = self.prototxt_template or proto.NetParameter(
            layer=[proto.LayerParameter(name=n) for n in self.layer_blobs()])
        cio.write_caffemodel(layer_blobs_to_net(self.layer_blobs(), template), weights)
        state = proto.SolverState(iter=self.iter, learned_net=os.path.basename(weights),
                                  current_step=self.current_step)
        for e in self.entries:
            state.history.append(cio.array_to_blob(e["history"].cpu().numpy()))
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "extra": extra_state}
        buf = _io.BytesIO()
        pickle.dump(rng, buf)
        state.rng_state = buf.getvalue()
        cio.atomic_write(base + ".solverstate", state.SerializeToString())
        return weights, base + ".solverstate"

    def restore(self, solverstate, load_weights=None):
        """Resume from a .solverstate (and its .caffemodel beside it, loaded
        with ``load_weights(path)`` when given). Returns the caller's extra
        state saved with the snapshot."""
        data = cio._read_bytes(solverstate, ".solverstate")
        state = cio._parse_binary(data, proto.SolverState, solverstate, ".solverstate (SolverState)")
        if len(state.history) != len(self.entries):
            raise cio.CaffeFormatError(f"{solverstate}: {len(state.history)} history blobs, this net "
                                       f"has {len(self.entries)} learnable parameters (another network?)")
        arrays = [cio.blob_to_array(b) for b in state.history]
        for i, (arr, e) in enumerate(zip(arrays, self.entries)):
            if arr.size != e["param"].numel():
                raise cio.CaffeFormatError(f"{solverstate}: history blob {i} has {arr.size} values, "
                                           f"parameter {i} has {e['param'].numel()} (another network?)")
        if load_weights is not None:
            weights = os.path.join(os.path.dirname(os.fspath(solverstate)), state.learned_net)
            load_weights(weights)
        with torch.no_grad():
            for arr, e in zip(arrays, self.entries):
                e["history"].copy_(torch.from_numpy(np.ascontiguousarray(arr)).reshape(e["history"].shape))
        self.iter, self.current_step = state.iter, state.current_step
        extra = None
        if state.rng_state:
            rng = pickle.loads(state.rng_state)
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            extra = rng["extra"]
        return extra
