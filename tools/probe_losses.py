#!/usr/bin/env python
"""What each loss does to the network at given weights: the loss terms, the pool1 NCC of positive
and negative pairs, each term's gradient on the layers below pool1 and above it, and how far the
weights moved between checkpoints. A diagnostic for the question "why does (or doesn't) the NCC
loss change the result?".

    python tools/probe_losses.py --data DB_DIR --weights STAGE1.caffemodel [STAGE2.caffemodel ...]
                                 [--solver prototxt_equiv/solver_cuhk01_cpu_stage2.prototxt]
                                 [--net NET.prototxt] [--batches 32] [--batch-pairs 16] [--seed 0]
                                 [--input-size 64x24] [--out probe.json]

Every weights file is probed on the same pairs: ``--batches`` batches of the training split drawn
by the training sampler and augmentation with ``--seed`` (two negative pairs per positive pair),
the network in its training mode (batch statistics, dropout with the same masks for every file),
as the solver sees it. The net is the one the (stage-2) solver names, or ``--net``; it must have
the NCCLoss layer. For each file it reports:

* the loss terms, unweighted: mean and standard deviation over the batches;
* the NCC loss's input: the mean ncc_max value s of the patches of positive pairs and of negative
  pairs, and how well a pair's mean s tells the two apart (the area under the ROC curve: 0.5 is
  chance, 1 perfect);
* each weighted loss term's gradient on three groups of parameters: the layers below pool1 (the
  only ones the NCC loss reaches), the rest of the backbone, and fc8. Three norms: "per batch",
  the mean over the batches of one batch's gradient norm; "averaged", the norm of the gradient
  averaged over the batches; "signal", an estimate of the norm of the expected gradient (the
  averaged norm with the batch-to-batch noise it still holds taken out: the part that points the
  same way from batch to batch, what many SGD steps add up). The NCC loss also as its positive
  pairs' share and its negative pairs' share (low_pos + low_neg = low). Beside them the cosines
  between averaged gradients below pool1 (the NCC loss's against the other terms' together; its
  positive share's against its negative share's), and the weight decay's gradient (the solver's
  weight_decay x decay_mult x the weights) for scale;
* from the second file on: each group's weight change relative to the first file,
  |W - W_first| / |W_first|, and relative to the previous file.

Prints a table per file and writes JSON (``--out``). The test and validation identities are never
read. Probing changes nothing on disk but the JSON.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from mspcnn.caffe import io as cio
from mspcnn.caffe import proto
from mspcnn.caffe.io import CaffeFormatError, atomic_write
from mspcnn.cli import add_input_size_argument, check_numbers, format_duration, run
from mspcnn.data.pairs import PairLoader, PairSampler
from mspcnn.data.transformer import train_transformer
from mspcnn.engine import open_training_data
from mspcnn.losses import ncc_loss_shares
from mspcnn.model import check_input_size
from mspcnn.ops import ncc_max
from mspcnn.paths import PROTOTXT_DIR
from mspcnn.runtime import add_threads_argument, configure_threads
from mspcnn.train_net import NetDefinitionError, read_train_net

GROUPS = ("below_pool1", "above_pool1", "fc8")
TERMS = ("cls", "high", "low", "low_pos", "low_neg")  # low = low_pos + low_neg


def roc_auc(pos, neg):
    """The probability that a positive score exceeds a negative one (ties count half)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv):  # average ranks of ties
        same = allv == v
        if same.sum() > 1:
            ranks[same] = ranks[same].mean()
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def parameter_groups(model):
    """{group: [(name, parameter)]}: the backbone's layers before pool1, the backbone's others, fc8."""
    order = list(model.backbone.layer_params)
    if "pool1" not in order:
        raise NetDefinitionError("the net has no pool1 layer (the NCC loss's input)")
    below = set(order[:order.index("pool1")])
    out = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        layer = parts[1] if parts[0] == "backbone" and len(parts) > 2 else parts[0]
        group = "fc8" if layer == "fc8" else "below_pool1" if layer in below else "above_pool1"
        out[group].append((name, p))
    return out


def signal_norm(mean, batch_norms):
    """An estimate of the norm of the expected gradient from B batch gradients g_b with mean m:
    E|m|^2 = |mu|^2 + tr(Sigma) / B, and tr(Sigma) is estimated by sum |g_b - m|^2 / (B - 1)
    = (sum |g_b|^2 - B |m|^2) / (B - 1). What is left of |m| once the batch-to-batch noise is taken
    out (0 when the noise explains all of it; None from one batch)."""
    b = len(batch_norms)
    if b < 2:
        return None
    m2 = float(mean.norm()) ** 2
    noise = (sum(x * x for x in batch_norms) - b * m2) / (b - 1)
    return math.sqrt(max(0.0, m2 - noise / b))


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def probe(model, batches, groups, weight_decay, seed):
    """The figures of one set of weights (already loaded into ``model``) on ``batches``."""
    params = [p for g in GROUPS for _, p in groups[g]]
    sizes = [sum(p.numel() for _, p in groups[g]) for g in GROUPS]
    captured = []
    hook = model.backbone.m("pool1").register_forward_hook(lambda mod, inp, out: captured.append(out))
    values = {t: [] for t in TERMS}
    norms = {g: {t: [] for t in TERMS} for g in GROUPS}  # one batch's gradient norm, per batch
    sums = {t: torch.zeros(sum(sizes), dtype=torch.float64) for t in TERMS}
    s_pos, s_neg, pair_pos, pair_neg = [], [], [], []
    torch.manual_seed(seed)  # the same dropout masks for every weights file
    try:
        for batch in batches:
            captured.clear()
            losses = model(batch["data"], batch["data_p"], batch["label"], batch["sim"])
            if len(captured) != 2:
                raise RuntimeError(f"pool1 ran {len(captured)} times in one forward pass, expected 2")
            a, b = captured
            p = model.ncc_params
            s = ncc_max(a.detach(), b.detach(), p["patch"], p["search_rows"], p["eps"])[0]
            pos = batch["sim"].trunc() != 0
            s_pos.append(s[pos].reshape(-1))
            s_neg.append(s[~pos].reshape(-1))
            per_pair = s.mean(dim=(1, 2, 3))
            pair_pos += per_pair[pos].tolist()
            pair_neg += per_pair[~pos].tolist()
            # The NCC loss's positive pairs' share and its negative pairs' share add up to it.
            losses["low_pos"], losses["low_neg"] = ncc_loss_shares(a, b, batch["sim"], **p)
            parts, whole = float((losses["low_pos"] + losses["low_neg"]).detach()), float(losses["low"].detach())
            if abs(parts - whole) > 1e-5 * max(1.0, abs(whole)):
                raise RuntimeError(f"the NCC loss's two shares add up to {parts}, not to its value {whole}")
            for k, term in enumerate(TERMS):
                values[term].append(float(losses[term].detach()))
                weight = getattr(model, f"w_{term.split('_')[0]}")
                grads = torch.autograd.grad(weight * losses[term], params, retain_graph=k < len(TERMS) - 1,
                                            allow_unused=True)
                g = flat([torch.zeros_like(q) if x is None else x for x, q in zip(grads, params)])
                sums[term] += g
                for group, part in zip(GROUPS, torch.split(g, sizes)):
                    norms[group][term].append(float(part.norm()))
    finally:
        hook.remove()
    n = len(values["cls"])
    out = {"losses": {t: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if n > 1 else 0.0}
                      for t, v in values.items()},
           "ncc": {"s_pos": float(torch.cat(s_pos).double().mean()), "s_neg": float(torch.cat(s_neg).double().mean()),
                   "pairs_pos": len(pair_pos), "pairs_neg": len(pair_neg), "auc": roc_auc(pair_pos, pair_neg)},
           "gradients": {}}
    means = {t: torch.split(sums[t] / n, sizes) for t in TERMS}
    decay = torch.split(flat([p * weight_decay * getattr(p, "decay_mult", 1.0) for p in params]), sizes)

    def cosine(x, y):
        denom = float(x.norm() * y.norm())
        return float(x.dot(y)) / denom if denom > 0 else None

    for k, group in enumerate(GROUPS):
        out["gradients"][group] = {
            "parameters": sizes[k],
            **{t: {"batch_norm": float(np.mean(norms[group][t])), "mean_norm": float(means[t][k].norm()),
                   "signal_norm": signal_norm(means[t][k], norms[group][t])} for t in TERMS},
            "cos_low_other": cosine(means["low"][k], means["cls"][k] + means["high"][k]),
            "cos_low_pos_neg": cosine(means["low_pos"][k], means["low_neg"][k]),
            "weight_decay_norm": float(decay[k].norm())}
    return out


def weight_vectors(model, groups):
    return {g: flat([p for _, p in groups[g]]) for g in GROUPS}


def print_table(path, r):
    print(f"\n== {path}")
    losses = r["losses"]
    print("losses (unweighted, mean +- sd over batches): "
          + ", ".join(f"{t} {losses[t]['mean']:.4f} +- {losses[t]['sd']:.4f}" for t in TERMS))
    c = r["ncc"]
    print(f"pool1 ncc_max: positive pairs {c['s_pos']:.4f}, negative pairs {c['s_neg']:.4f}; "
          f"AUC of a pair's mean {c['auc']:.3f} ({c['pairs_pos']} positive, {c['pairs_neg']} negative pairs)")
    print(f"{'gradient norm (weighted)':<18}" + "".join(f"{g:>33}" for g in GROUPS))
    print(f"{'':<18}" + "".join(f"{'per batch':>11}{'averaged':>11}{'signal':>11}" for _ in GROUPS))

    def cell(x):
        return f"{'n/a':>11}" if x is None else f"{x:>11.4g}"

    for t in TERMS:
        print(f"{t:<18}" + "".join(cell(r["gradients"][g][t]["batch_norm"]) + cell(r["gradients"][g][t]["mean_norm"])
                                   + cell(r["gradients"][g][t]["signal_norm"]) for g in GROUPS))
    print(f"{'weight decay':<18}" + "".join(f"{r['gradients'][g]['weight_decay_norm']:>33.4g}" for g in GROUPS))
    cos = r["gradients"]["below_pool1"]["cos_low_other"]
    share = r["gradients"]["below_pool1"]["cos_low_pos_neg"]
    print(f"cosine of the averaged gradients below pool1: low against cls + high "
          f"{'n/a' if cos is None else f'{cos:+.3f}'}, low's positive share against its negative share "
          f"{'n/a' if share is None else f'{share:+.3f}'}")
    if "moved" in r:
        print("weights moved, |W - W_first| / |W_first|: " + ", ".join(f"{g} {r['moved'][g]:.4g}" for g in GROUPS)
              + "; from the previous file: " + ", ".join(f"{g} {r['moved_previous'][g]:.4g}" for g in GROUPS))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder written by tools/convert_dataset.py")
    p.add_argument("--weights", nargs="+", required=True, help="one or more .caffemodel files, probed in order")
    p.add_argument("--solver", default=str(PROTOTXT_DIR / "solver_cuhk01_cpu_stage2.prototxt"),
                   help="the stage-2 solver whose net (and weight_decay) to use (default: the CUHK01 CPU recipe's)")
    p.add_argument("--net", help="a training net to use instead of the solver's (it must have the NCCLoss layer)")
    p.add_argument("--batches", type=int, default=32, help="batches to probe (default 32)")
    p.add_argument("--batch-pairs", type=int, default=16, help="pairs per batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs, the augmentation and dropout (default 0)")
    add_input_size_argument(p, default=None, help="the network's input, height x width (default: the net's, [1]'s "
                            "144x56); the size the weights trained at, e.g. 64x24 for the cpu64 recipe")
    p.add_argument("--out", help="write the figures as JSON here")
    add_threads_argument(p)
    args = p.parse_args(argv)
    try:
        check_numbers(("--batches", args.batches, 1), ("--batch-pairs", args.batch_pairs, 1))
    except ValueError as exc:
        p.error(str(exc))
    if args.batches != int(args.batches) or args.batch_pairs != int(args.batch_pairs):
        p.error("--batches and --batch-pairs must be whole numbers")
    for path in args.weights:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--weights: file not found: {path}")
    print(f"cpu: {configure_threads(args.threads)}", file=sys.stderr, flush=True)
    if not os.path.isfile(args.solver):
        raise FileNotFoundError(f"--solver: file not found: {args.solver}")
    sp = cio.read_prototxt(args.solver, proto.SolverParameter)
    train_net = read_train_net(sp, args.solver, net=args.net)
    if "loss_low" not in train_net.layers:
        raise NetDefinitionError(f"{train_net.source}: no NCCLoss layer (loss_low) in the training net; give the "
                                 "stage-2 solver or --net with it")
    lacking = [name for name in ("loss_cls", "loss_high") if name not in train_net.layers]
    if lacking:
        raise NetDefinitionError(f"{train_net.source}: the training net has no {' or '.join(lacking)} layer; the "
                                 "probe compares the NCC loss with MSP-CNN's other two losses")
    if args.input_size is not None:
        train_net.input_size = check_input_size(args.input_size)
    rows, labels, db, _ = open_training_data(args.data, train_net, args.batch_pairs)
    model = train_net.build(max(labels) + 1, generator=torch.Generator().manual_seed(0))
    model.use_low = True
    model.pair_branches = False  # two passes, so that pool1's hook sees each branch
    model.train()
    groups = parameter_groups(model)

    sampler = PairSampler(labels, [r["camera"] for r in rows], seed=args.seed)
    loader = PairLoader(db, labels, sampler, args.batch_pairs, train_transformer(args.seed, train_net.input_size),
                        workers=1)
    batches, stream = [], loader.stream(0)
    try:
        for _, _, batch in stream:
            batches.append(batch)
            if len(batches) == args.batches:
                break
    finally:
        stream.close()
        loader.close()

    results, first, previous, start = [], None, None, time.time()
    for k, path in enumerate(args.weights):
        try:
            model.load_caffemodel(path)
        except (CaffeFormatError, ValueError, KeyError) as exc:
            raise CaffeFormatError(f"{path}: cannot be loaded into the net of {train_net.source} ({exc})") from None
        r = {"weights": path, **probe(model, batches, groups, float(sp.weight_decay), args.seed)}
        now = weight_vectors(model, groups)
        if first is None:
            first = now
        else:
            r["moved"] = {g: float((now[g] - first[g]).norm() / first[g].norm()) for g in GROUPS}
            r["moved_previous"] = {g: float((now[g] - previous[g]).norm() / previous[g].norm()) for g in GROUPS}
        previous = now
        results.append(r)
        print_table(path, r)
        left = (time.time() - start) / (k + 1) * (len(args.weights) - k - 1)
        print(f"[{k + 1}/{len(args.weights)}] {time.time() - start:.0f} s, ETA {format_duration(left)}",
              file=sys.stderr, flush=True)
    if args.out:
        settings = {"data": args.data, "solver": args.solver, "net": train_net.source, "batches": args.batches,
                    "batch_pairs": args.batch_pairs, "seed": args.seed, "input_size": list(train_net.input_size),
                    "loss_weights": {t: getattr(model, f"w_{t}") for t in ("cls", "high", "low")}, "ncc_params": model.ncc_params,
                    "weight_decay": float(sp.weight_decay)}
        atomic_write(args.out, json.dumps({"settings": settings, "results": results}, indent=1), mode="w")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
