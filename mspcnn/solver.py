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
blobs, current step, and -- our fields 1002-1006 -- the random states of torch
and numpy as plain bytes and integers, the pair sampler's position and the
SHA-256 of the weights file), each written to a temporary file and renamed, so
a crash mid-snapshot leaves the previous snapshot intact. Nothing read from a
snapshot is ever executed: old snapshots whose random states were pickled are
refused with a message.
"""
import hashlib
import math
import os

import numpy as np
import torch

from mspcnn.caffe import io as cio
from mspcnn.caffe import proto
from mspcnn.cli import check_numbers

__all__ = ["learning_rate", "SGDSolver", "KNOWN_POLICIES", "check_solver"]

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


def check_solver(sp):
    """Raise ValueError naming the field when a SolverParameter cannot be trained with: a learning
    rate, momentum, decay or policy parameter that is not a finite number in its range, a negative
    iteration count or interval, an unknown policy or solver type."""
    def finite(name, minimum=None, required=False):
        if not sp.HasField(name):
            if required:
                raise ValueError(f"{name} is not set")
            return
        check_numbers((name, getattr(sp, name), minimum))

    finite("base_lr", 0, required=True)
    finite("momentum", 0)
    finite("weight_decay", 0)
    finite("gamma")
    finite("power")
    finite("min_lr", 0)
    if not sp.HasField("max_iter"):
        raise ValueError("max_iter is not set")
    for name in ("max_iter", "display", "test_interval", "snapshot", "stepsize"):
        if getattr(sp, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(sp, name)}")
    for name in ("iter_size", "average_loss"):
        if getattr(sp, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(sp, name)}")
    if not sp.lr_policy:
        raise ValueError("lr_policy is not set")
    if sp.type not in ("SGD", ""):
        raise ValueError(f"solver type {sp.type!r}: only SGD is implemented")
    if sp.clip_gradients >= 0 and not math.isfinite(sp.clip_gradients):
        raise ValueError(f"clip_gradients must be finite, got {sp.clip_gradients}")
    learning_rate(sp, 0)  # the policy is known and has its parameters


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

    def step(self, forward_backward, reduce_gradients=None, clear_gradients=True):
        """One Caffe iteration. ``forward_backward(k)`` runs sub-iteration k
        (0 .. iter_size-1): a forward pass and ``loss.backward()``; it returns
        the loss value (a float, or a 0-dim tensor that the caller reads when it
        needs it). ``reduce_gradients()``, when given, runs after the
        passes and before the update (data-parallel training averages the
        accumulated gradients of the workers there, as Caffe's multi-GPU
        solver does). Returns the mean loss over the sub-iterations (a float or
        a tensor, as forward_backward returns). ``clear_gradients=False`` keeps the gradient
        tensors from the last iteration: the caller's first pass must overwrite them (a replayed
        CUDA graph does, see mspcnn.cuda_graphs)."""
        if clear_gradients:
            self.zero_grad()
        iter_size = max(1, int(self.param.iter_size))
        losses = [forward_backward(k) for k in range(iter_size)]  # floats, or tensors left on the device
        if reduce_gradients is not None:
            reduce_gradients()
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
        # Caffe's update, parameter by parameter: diff = g / iter_size + local_decay * p (or
        # sign(p) for L1), history = momentum * history + local_rate * diff, p -= history. The
        # parameters that share (local_decay, local_rate) go through the same operations together
        # (torch._foreach_*: one call for the group, the same arithmetic on each tensor), so that
        # a GPU iteration launches a few dozen kernels for the update instead of about 730.
        groups = {}
        for e, g in zip(self.entries, grads):
            key = (float(decay * f32(e["decay_mult"])), float(f32(rate) * f32(e["lr_mult"])))
            groups.setdefault(key, []).append((e, g))
        for (local_decay, local_rate), members in groups.items():
            params = [e["param"] for e, _ in members]
            history = [e["history"] for e, _ in members]
            diffs = (torch._foreach_div([g for _, g in members], iter_size) if iter_size > 1
                     else [g.clone() for _, g in members])
            if local_decay:
                reg = params if sp.regularization_type == "L2" else torch._foreach_sign(params)
                torch._foreach_add_(diffs, torch._foreach_mul(reg, local_decay))
            torch._foreach_mul_(history, float(momentum))
            torch._foreach_add_(history, diffs, alpha=local_rate)
            torch._foreach_sub_(params, history)

    # -------------------------------------------------------------- snapshots
    def snapshot(self, prefix=None, data_position=None):
        """Write <prefix>_iter_<N>.caffemodel and .solverstate; returns their paths.
        ``data_position``: (epoch, batch) of the data layer, restored by :meth:`restore`."""
        prefix = prefix or self.param.snapshot_prefix or "snapshot"
        base = f"{prefix}_iter_{self.iter}"
        weights = base + ".caffemodel"
        if self.layer_blobs is None:
            raise ValueError("SGDSolver.snapshot: no layer_blobs given, cannot write weights")
        from mspcnn.caffe.weights import layer_blobs_to_net

        template = self.prototxt_template or proto.NetParameter(
            layer=[proto.LayerParameter(name=n) for n in self.layer_blobs()])
        net_bytes = layer_blobs_to_net(self.layer_blobs(), template).SerializeToString()
        cio.atomic_write(weights, net_bytes)
        state = proto.SolverState(iter=self.iter, learned_net=os.path.basename(weights),
                                  current_step=self.current_step)
        for e in self.entries:
            state.history.append(cio.array_to_blob(e["history"].cpu().numpy()))
        state.torch_rng_state = torch.get_rng_state().numpy().tobytes()
        kind, key, pos, has_gauss, cached = np.random.get_state()
        state.numpy_rng_state.key.extend(int(k) for k in key)
        state.numpy_rng_state.pos, state.numpy_rng_state.has_gauss = int(pos), int(has_gauss)
        state.numpy_rng_state.cached_gaussian = float(cached)
        if data_position is not None:
            state.data_epoch, state.data_batch = (int(v) for v in data_position)
        state.learned_net_sha256 = hashlib.sha256(net_bytes).hexdigest()
        cio.atomic_write(base + ".solverstate", state.SerializeToString())
        return weights, base + ".solverstate"

    def restore(self, solverstate, load_weights=None):
        """Resume from a .solverstate and the .caffemodel it names (in the same folder; loaded with
        ``load_weights(path)`` when given). Everything is checked before anything changes: the
        history blobs against the parameters, the weights file against the SHA-256 the snapshot
        recorded (a .caffemodel of another run is refused). Returns the data layer's position
        (epoch, batch), or None when the snapshot has none.

        Raises CaffeFormatError naming the file for a damaged or foreign snapshot, and for a
        snapshot of mspcnn before 2026-11, whose random states were stored with pickle: loading
        those could run code, so they are refused."""
        state = cio.read_solverstate(solverstate)
        where = os.fspath(solverstate)
        if state.HasField("rng_state"):
            raise cio.CaffeFormatError(
                f"{where}: this snapshot stores its random states with pickle (mspcnn before 2026-11); "
                "loading it could run code, so it is refused. Resume from a newer snapshot, or start "
                "from its weights with --weights (the run then continues with fresh random states)")
        if len(state.history) != len(self.entries):
            raise cio.CaffeFormatError(f"{where}: {len(state.history)} history blobs, this net "
                                       f"has {len(self.entries)} learnable parameters (another network?)")
        arrays = [cio.blob_to_array(b) for b in state.history]
        for i, (arr, e) in enumerate(zip(arrays, self.entries)):
            if arr.size != e["param"].numel():
                raise cio.CaffeFormatError(f"{where}: history blob {i} has {arr.size} values, "
                                           f"parameter {i} has {e['param'].numel()} (another network?)")
        name = state.learned_net
        if not name or name != os.path.basename(name) or name in (".", "..") or "\\" in name:
            raise cio.CaffeFormatError(f"{where}: learned_net {name!r} is not a file name in the "
                                       "snapshot's folder")
        torch_state = None
        if state.HasField("torch_rng_state"):
            torch_state = torch.frombuffer(bytearray(state.torch_rng_state), dtype=torch.uint8)
            if torch_state.numel() != torch.get_rng_state().numel():
                raise cio.CaffeFormatError(f"{where}: the torch random state has {torch_state.numel()} "
                                           f"bytes, expected {torch.get_rng_state().numel()}")
        np_state = None
        if state.HasField("numpy_rng_state"):
            ns = state.numpy_rng_state
            if len(ns.key) != 624 or not 0 <= ns.pos <= 624:
                raise cio.CaffeFormatError(f"{where}: damaged numpy random state ({len(ns.key)} keys, "
                                           f"position {ns.pos})")
            np_state = ("MT19937", np.asarray(ns.key, np.uint32), int(ns.pos), int(ns.has_gauss),
                        float(ns.cached_gaussian))
        weights = os.path.join(os.path.dirname(where), name)
        if load_weights is not None:
            if state.HasField("learned_net_sha256"):
                try:
                    with open(weights, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                except FileNotFoundError:
                    raise cio.CaffeFormatError(f"{where}: its weights {weights} are missing") from None
                if digest != state.learned_net_sha256:
                    raise cio.CaffeFormatError(
                        f"{where}: {weights} is not the weights file this snapshot was written with "
                        "(SHA-256 differs: another run wrote it, or it was changed)")
            load_weights(weights)
        with torch.no_grad():
            for arr, e in zip(arrays, self.entries):
                e["history"].copy_(torch.from_numpy(np.ascontiguousarray(arr)).reshape(e["history"].shape))
        self.iter, self.current_step = state.iter, state.current_step
        if torch_state is not None:
            torch.set_rng_state(torch_state)
        if np_state is not None:
            np.random.set_state(np_state)
        if state.HasField("data_epoch"):
            return int(state.data_epoch), int(state.data_batch)
        return None
