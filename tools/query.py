#!/usr/bin/env python
"""Rank an offline gallery index for query images and render the top-k.

    python tools/query.py --index gallery.index --weights W.caffemodel IMAGE [IMAGE ...]
                          [--top 10] [--out ranking.png] [--query-ids ID ...]

Each query image (any size; resized to 160 x 64 as the databases are) is embedded with the
model, the gallery is ranked by Euclidean distance between L2-normalised features, and the
top-k are printed and drawn in one row per query. When --query-ids are given and the index
knows the gallery identities, frames are green for the same identity and red otherwise (grey
when identities are not known).
"""
import argparse
import os
import sys

import torch

from mspcnn.caffe.io import CaffeFormatError
from mspcnn.cli import add_device_argument, add_input_size_argument, run
from mspcnn.runtime import add_threads_argument, configure_threads
from mspcnn.data.lmdb_io import DatumDB
from mspcnn.data.transformer import feature_transformer, read_image_for
from mspcnn.index import load_index, search
from mspcnn.model import feature_model
from mspcnn.plots import RIGHT, UNKNOWN, WRONG, draw_ranking


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="query images (any size; resized to 160 x 64, or as --input-size says)")
    p.add_argument("--index", required=True, help="an index written by tools/build_index.py")
    p.add_argument("--weights", required=True, help="the weights the index was built with")
    p.add_argument("--top", type=int, default=10, help="gallery images shown per query (default 10)")
    p.add_argument("--out", default="ranking.png", help="the ranking picture to write (default ranking.png)")
    p.add_argument("--query-ids", type=int, nargs="*",
               help="the identity of each query image, to colour right and wrong matches")
    add_device_argument(p)
    p.add_argument("--effort", type=int, help="search effort of an approximate FAISS index (HNSW's efSearch, "
                   "IVF's nprobe; default: FAISS's)")
    p.add_argument("--allow-partial", action="store_true",
                   help="accept weights that lack some layers (they keep their initial values; listed)")
    add_input_size_argument(p)
    add_threads_argument(p)
    args = p.parse_args(argv)
    print(f"cpu: {configure_threads(args.threads)}", file=sys.stderr, flush=True)
    if args.query_ids and len(args.query_ids) != len(args.images):
        p.error("--query-ids needs one identity per image")
    if args.top < 1:
        p.error("--top must be at least 1")
    try:
        index = load_index(args.index)
        gallery = DatumDB(index["db"])
        backbone = feature_model(args.weights, args.device, args.allow_partial, input_size=args.input_size)
        if backbone.skipped_layers:
            print(f"warning: {args.weights} lacks {len(backbone.skipped_layers)} layers, left at their initial "
                  f"values: {', '.join(backbone.skipped_layers)}", file=sys.stderr)
    except (OSError, CaffeFormatError) as exc:  # CaffeFormatError: also a bad index file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if index.get("weights") and os.path.abspath(args.weights) != index["weights"]:
        print(f"note: the index was built with {index['weights']}; its features and the queries' "
              f"({args.weights}) are comparable only if the weights are the same", file=sys.stderr)
    if index.get("input_size") and tuple(index["input_size"]) != backbone.input_size:
        print(f"error: the index's features were computed at an input of {' x '.join(map(str, index['input_size']))}, "
              f"the queries' would be at {' x '.join(map(str, backbone.input_size))}: give --input-size "
              f"{'x'.join(map(str, index['input_size']))}", file=sys.stderr)
        return 2
    try:
        images = [read_image_for(path, backbone.input_size) for path in args.images]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    x = torch.from_numpy(feature_transformer(backbone.input_size)(images))
    with torch.no_grad():
        q = torch.nn.functional.normalize(backbone(x.to(args.device), logits=False)["fc7_bn"].cpu())
    dists, positions = search(index, q, args.top, effort=args.effort)
    rows = []
    for i, path in enumerate(args.images):
        order = positions[i].tolist()
        print(f"{path}:")
        ranked = []
        for rank, j in enumerate(order, 1):
            gid = index["ids"][j] if "ids" in index else None
            print(f"  {rank:>3}. {index['keys'][j]}  distance {dists[i, rank - 1]:.4f}"
                  + (f"  id {gid}" if gid is not None else ""))
            colour = UNKNOWN
            if args.query_ids and gid is not None:
                colour = RIGHT if gid == args.query_ids[i] else WRONG
            ranked.append((gallery[j][0].transpose(1, 2, 0), colour, f"#{rank}|d {dists[i, rank - 1]:.2f}"))
        label = f"id {args.query_ids[i]}" if args.query_ids else f"query {i + 1}"
        rows.append(((images[i].transpose(1, 2, 0), label), ranked))
    try:
        draw_ranking(args.out, rows, legend=["#k: rank; d: Euclidean distance of L2-normalised features"])
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
