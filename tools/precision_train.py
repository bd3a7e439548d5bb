#!/usr/bin/env python
"""How far a float32 training pass of MSP-CNN is from float64, for each way the engine can run it.

    python tools/precision_train.py [--pairs 4 2] [--stage 2] [--seeds 0 1 2] [--json precision.json]

For each seed: one MSP-CNN (random Caffe fillers, BatchNorm statistics in the training phase, the
NCC loss on in stage 2, dropout off so that both precisions see the same function), one random batch
of pairs, one forward and backward pass. The float64 copy, run with PyTorch's operations, is the
reference. For every parameter (the 162 blobs but the 40 biases that BatchNorm makes irrelevant:
see compared()) the error of its float32 gradient is the largest
absolute difference from the float64 gradient, relative to the float64 gradient's largest element;
the table gives the median, 90th percentile and largest over the parameters, and the loss's relative
error. Modes:

* `kernels`: the engine's CPU default, our paths for BatchNorm + Scale + ReLU (one C++ operator, sums
  in double) and pooling (channels-last kernels, our MAX backward; mspcnn.caffe.kernels);
* `torch-ops`: PyTorch's operations for those layers (``model.backbone.cpu_kernels = False``; what
  runs on a GPU);
* `channels-last`: PyTorch's operations on channels-last tensors (``solve(channels_last=True)``);
* `float64-perturbed`: not a float32 mode but the floor any float32 mode can reach: the float64
  network itself with every weight multiplied by (1 + u), u ~ N(0, 2^-24), a rounding of float32's
  size. Max pooling, ReLU and the NCC loss's argmax are discontinuous: a perturbation that small
  already moves some of them, and the gradients with them.

The errors are far larger than float32's 6e-8 in every mode, and of the size of the perturbed
float64 network's: at this batch the gradient is defined to about 1e-3 by float32-sized changes of
the weights, whatever the arithmetic. Differences between the modes smaller than the spread over
seeds say nothing about their arithmetic. No timings.
"""
import argparse
import copy
import json
import os
import sys

import numpy as np
import torch

from mspcnn.caffe.io import atomic_write, writable_folder
from mspcnn.cli import run
from mspcnn.model import MSPCNN
from mspcnn.runtime import configure_threads

MODES = ("kernels", "torch-ops", "channels-last", "float64-perturbed")
U32 = 2.0 ** -24  # float32's unit roundoff


def compared(model):
    """Names of the parameters compared: all but the biases of the layers that BatchNorm follows
    (every convolution and fc7), whose exact gradient is 0 (BatchNorm subtracts the batch mean, so a
    constant added per channel changes nothing): float32 leaves rounding noise there, and an error
    relative to an exact 0 means nothing."""
    skip = {f"{name}.bias" for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Conv2d) or name.endswith("backbone.fc7")}
    return [name for name, _ in model.named_parameters() if name not in skip]


def gradients(model, batch):
    model.zero_grad(set_to_none=True)
    losses = model(*batch)
    losses["total"].backward()
    params = dict(model.named_parameters())
    return losses["total"].item(), [params[n].grad.detach().double().clone() for n in compared(model)]


def one_seed(seed, pairs, stage, modes):
    g = torch.Generator().manual_seed(seed)
    model = MSPCNN(20, use_low=stage == 2, dropout=0.0, generator=torch.Generator().manual_seed(seed)).train()
    batch64 = (torch.randn(pairs, 3, 144, 56, generator=g, dtype=torch.float64),
               torch.randn(pairs, 3, 144, 56, generator=g, dtype=torch.float64),
               torch.randint(0, 20, (pairs,), generator=g).double(),
               (torch.arange(pairs) % 2 == 0).double())
    ref = copy.deepcopy(model).double()
    ref.backbone.cpu_kernels = False
    loss64, grads64 = gradients(ref, batch64)
    out = {}
    for mode in modes:
        if mode == "float64-perturbed":
            m, batch = copy.deepcopy(ref), batch64
            pert = torch.Generator().manual_seed(seed + 1000)
            with torch.no_grad():
                for q in m.parameters():
                    q.mul_(1 + U32 * torch.randn(q.shape, generator=pert, dtype=q.dtype))
        else:
            m = copy.deepcopy(model).float()
            batch = tuple(t.float() for t in batch64)
            m.backbone.cpu_kernels = mode == "kernels"
            if mode == "channels-last":
                m = m.to(memory_format=torch.channels_last)
                batch = (batch[0].contiguous(memory_format=torch.channels_last),
                         batch[1].contiguous(memory_format=torch.channels_last)) + batch[2:]
        loss, grads = gradients(m, batch)
        errs = [((g - g64).abs().max() / g64.abs().max().clamp_min(1e-30)).item()
                for g, g64 in zip(grads, grads64)]
        out[mode] = {"loss_rel_error": abs(loss - loss64) / abs(loss64), "grad_errors": errs}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, nargs="+", default=[4, 2], help="pairs per batch (default 4 2)")
    p.add_argument("--stage", type=int, default=2, choices=[1, 2], help="1: without the NCC loss; 2: with it "
                   "(default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model and batch seeds (default 0 1 2)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="modes (default all)")
    p.add_argument("--threads", help="intra-op threads: a number, or auto (default)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if min(args.pairs) < 2:
        p.error("--pairs must be >= 2 (a pair batch needs a similar and a dissimilar pair)")
    if args.json:  # before the work, not after it
        writable_folder(os.path.dirname(args.json) or ".", "--json")
    print(f"cpu: {configure_threads(args.threads)}", flush=True)
    rows = []
    for pairs in args.pairs:
        for seed in args.seeds:
            res = one_seed(seed, pairs, args.stage, args.modes)
            for mode, r in res.items():
                e = np.array(r["grad_errors"])
                rows.append({"pairs": pairs, "seed": seed, "mode": mode, "loss_rel_error": r["loss_rel_error"],
                             "median": float(np.median(e)), "p90": float(np.percentile(e, 90)),
                             "max": float(e.max()), "grad_errors": r["grad_errors"]})
                print(f"  {pairs} pairs, seed {seed}, {mode}: median {rows[-1]['median']:.1e}", flush=True)
    print(f"\nstage {args.stage}; error of each parameter's float32 gradient against float64, relative to the "
          "float64 gradient's largest element, over the parameters")
    print(f"{'pairs':>5} {'seed':>4} {'mode':>17} {'median':>9} {'p90':>9} {'max':>9} {'loss err':>9}")
    for r in rows:
        print(f"{r['pairs']:>5} {r['seed']:>4} {r['mode']:>17} {r['median']:>9.1e} {r['p90']:>9.1e} "
              f"{r['max']:>9.1e} {r['loss_rel_error']:>9.1e}")
    print("\nper mode, over seeds (geometric mean of the medians, and the worst max):")
    for pairs in args.pairs:
        for mode in args.modes:
            sel = [r for r in rows if r["pairs"] == pairs and r["mode"] == mode]
            gm = float(np.exp(np.mean(np.log([r["median"] for r in sel]))))
            print(f"  {pairs} pairs, {mode:>17}: median {gm:.1e}, worst {max(r['max'] for r in sel):.1e}")
    if args.json:
        atomic_write(args.json, json.dumps({"stage": args.stage, "torch": torch.__version__,
                                            "threads": torch.get_num_threads(), "rows": rows}, indent=1), mode="w")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
