#!/usr/bin/env python
"""Evaluate trained weights on the test split of a converted dataset.

    python tools/evaluate.py --weights W.caffemodel --data DB_DIR
                             [--protocol auto|market1501|single-shot] [--repeats 100] [--seed 0]
                             [--device cpu|cuda] [--batch-size 32]
                             [--json results.json] [--cmc cmc.png] [--features features.pt]

* DB_DIR is a folder written by tools/convert_dataset.py; its probe and gallery databases are
  embedded (L2-normalised fc7_bn features, TEST-phase transform) and compared by Euclidean
  distance.
* The protocol follows the dataset (mspcnn.evaluation.protocol_of):
  * Market-1501 and CUHK03 767/700: Market-1501's official evaluation, with junk rules and
    trapezoidal AP. The non-interpolated mAP of torchreid/fast-reid is printed beside it.
  * Classic CUHK03 and CUHK01 splits: single-shot CMC over --repeats random gallery draws, seeded
    by --seed.
  * --protocol overrides the choice.
* Prints CMC rank-1/5/10/20 and mAP.
* Optional outputs:
  * --json: the metrics and the CMC curve.
  * --cmc: a plot of the curve.
  * --features: the features with their identities, cameras and keys, for other tools
    (torch.load(path, weights_only=True)).
"""
import argparse
import io
import json
import os
import sys

import torch

from mspcnn.caffe.io import atomic_write
from mspcnn.cli import add_device_argument, add_input_size_argument, run
from mspcnn.runtime import add_threads_argument, configure_threads
from mspcnn.evaluation import PROTOCOLS, evaluate_features, folder_features, protocol_of
from mspcnn.model import feature_model
from mspcnn.plots import draw_cmc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a .caffemodel (e.g. stage 2's last snapshot)")
    p.add_argument("--data", required=True, help="a folder written by tools/convert_dataset.py")
    p.add_argument("--protocol", default="auto", choices=("auto",) + PROTOCOLS,
               help="auto (default: from the dataset), market1501 or single-shot")
    p.add_argument("--repeats", type=int, default=100, help="gallery draws of the single-shot protocol")
    p.add_argument("--seed", type=int, default=0, help="seed of the single-shot gallery draws")
    add_device_argument(p)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--json", help="write the metrics and the CMC curve here")
    p.add_argument("--cmc", help="draw the CMC curve to this PNG")
    p.add_argument("--features", help="save the features, identities, cameras and keys here")
    p.add_argument("--allow-partial", action="store_true",
                   help="accept weights that lack some layers (they keep their initial values; listed)")
    p.add_argument("--rerank", type=float, nargs=3, metavar=("K1", "K2", "LAMBDA"),
                   help="rank by k-reciprocal re-ranked distances (Zhong et al., CVPR 2017; e.g. 20 6 0.3)")
    add_input_size_argument(p)
    add_threads_argument(p)
    args = p.parse_args(argv)
    print(f"cpu: {configure_threads(args.threads)}", file=sys.stderr, flush=True)
    if args.repeats < 1 or args.batch_size < 1:
        p.error("--repeats and --batch-size must be at least 1")
    if not os.path.isdir(args.data):
        p.error(f"--data {args.data}: no such folder")
    try:
        backbone = feature_model(args.weights, args.device, args.allow_partial, input_size=args.input_size)
        if backbone.skipped_layers:
            print(f"warning: {args.weights} lacks {len(backbone.skipped_layers)} layers, left at their initial "
                  f"values: {', '.join(backbone.skipped_layers)}", file=sys.stderr)
        feats = folder_features(backbone, args.data, device=args.device, batch_size=args.batch_size)
        for note in feats["warnings"]:
            print(f"warning: {note}", file=sys.stderr)
    except (OSError, ValueError) as exc:  # missing files, foreign weights (CaffeFormatError), bad folder
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = feats["meta"]
    protocol = protocol_of(meta) if args.protocol == "auto" else args.protocol
    probe, gallery = feats["probe"], feats["gallery"]
    try:
        rerank = None
        if args.rerank:
            rerank = {"k1": int(args.rerank[0]), "k2": int(args.rerank[1]), "lambda_value": args.rerank[2]}
        result, _ = evaluate_features(probe, gallery, protocol, repeats=args.repeats, seed=args.seed, rerank=rerank,
                                      return_dist=False)
    except ValueError as exc:  # e.g. no query has a match in the gallery
        print(f"error: {args.data}: {exc}", file=sys.stderr)
        return 2

    name = meta.get("dataset", "?") + (f" ({meta['protocol']})" if "protocol" in meta else "")
    print(f"{name}: {len(probe['ids'])} queries, {len(gallery['ids'])} gallery images, protocol {protocol}"
          + (f", {args.repeats} gallery draws" if protocol == "single-shot" else "")
          + (f", k-reciprocal re-ranking (k1 {args.rerank[0]:g}, k2 {args.rerank[1]:g}, lambda {args.rerank[2]:g})"
             if args.rerank else ""))
    ranks = [r for r in (1, 5, 10, 20) if f"rank{r}" in result]
    header = "".join(f"{f'rank-{r}':>9}" for r in ranks) + ("      mAP  mAP (non-interp.)" if "mAP" in result else "")
    print(header)
    print("".join(f"{100 * result[f'rank{r}']:>8.2f}%" for r in ranks)
          + (f" {100 * result['mAP']:>7.2f}% {100 * result['mAP_noninterp']:>17.2f}%" if "mAP" in result else ""))
    if result.get("skipped_queries"):
        print(f"({result['skipped_queries']} queries without a good match in the gallery are left out)")

    try:
        if args.json:
            record = {"weights": os.path.abspath(args.weights), "data": os.path.abspath(args.data),
                      "input_size": list(backbone.input_size), "protocol": protocol, "dataset": meta, "result": result}
            atomic_write(args.json, json.dumps(record, indent=1), mode="w")
        if args.cmc:
            draw_cmc({os.path.basename(args.weights): result["cmc"]}, args.cmc,
                     max_rank=min(20, len(result["cmc"])), title=f"CMC, {name}, {protocol}")
        if args.features:
            saved = {s: {k: v for k, v in feats[s].items() if k != "db"} for s in ("probe", "gallery")}
            saved.update(weights=os.path.abspath(args.weights), data=os.path.abspath(args.data))
            buf = io.BytesIO()
            torch.save(saved, buf)
            atomic_write(args.features, buf.getvalue())
    except OSError as exc:
        print(f"error: cannot write an output: {exc}", file=sys.stderr)
        return 2
    for label, path in (("metrics", args.json), ("CMC curve", args.cmc), ("features", args.features)):
        if path:
            print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
