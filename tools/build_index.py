#!/usr/bin/env python
"""Build an offline gallery index: extract and store L2-normalised fc7_bn features of a gallery.

    python tools/build_index.py --weights W.caffemodel --db DB_DIR/gallery.lmdb --out gallery.index
                                [--device cpu|cuda] [--batch-size 32]

The index (a torch file, format in mspcnn/index.py) holds the features, the record keys and, when DB_DIR/<split>.json
exists beside the database, identities, cameras and source paths. tools/query.py ranks it.
"""
import argparse
import json
import os
import sys

from mspcnn.caffe.io import CaffeFormatError
from mspcnn.cli import add_device_argument, add_input_size_argument, run
from mspcnn.runtime import add_threads_argument, configure_threads
from mspcnn.data.lmdb_io import DatumDB
from mspcnn.evaluation import db_size_note, extract_features
from mspcnn.index import write_index
from mspcnn.data.transformer import feature_transformer
from mspcnn.model import feature_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a .caffemodel (a training snapshot or deploy weights)")
    p.add_argument("--db", required=True, help="an LMDB written by tools/convert_dataset.py")
    p.add_argument("--out", required=True, help="the index file to write")
    add_device_argument(p)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--faiss", choices=("flat", "hnsw", "ivf"),
                   help="also build a FAISS index (optional package faiss-cpu): flat = exact, hnsw or ivf = "
                        "approximate and faster on large galleries")
    p.add_argument("--allow-partial", action="store_true",
                   help="accept weights that lack some layers (they keep their initial values; listed)")
    add_input_size_argument(p)
    add_threads_argument(p)
    args = p.parse_args(argv)
    print(f"cpu: {configure_threads(args.threads)}", file=sys.stderr, flush=True)
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if os.path.isdir(args.out):
        p.error(f"--out {args.out} is a folder; give a file name")
    try:
        db = DatumDB(args.db)
        backbone = feature_model(args.weights, args.device, args.allow_partial, input_size=args.input_size)
        if backbone.skipped_layers:
            print(f"warning: {args.weights} lacks {len(backbone.skipped_layers)} layers, left at their initial "
                  f"values: {', '.join(backbone.skipped_layers)}", file=sys.stderr)
    except (FileNotFoundError, CaffeFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta_path = args.db[:-5] + ".json" if args.db.rstrip("/").endswith(".lmdb") else None
    rows = json.load(open(meta_path))["records"] if meta_path and os.path.exists(meta_path) else None
    note = db_size_note(db, backbone.input_size)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    print(f"extracting {len(db)} gallery features from {args.db} ...", flush=True)
    feats = extract_features(backbone, db, feature_transformer(backbone.input_size),
                             args.batch_size, args.device, progress="gallery")
    write_index(args.out, feats, [k.decode() for k in db.keys], args.db, args.weights,
                ids=[r["id"] for r in rows] if rows else None, cameras=[r["camera"] for r in rows] if rows else None,
                search_kind=args.faiss, input_size=backbone.input_size)
    print(f"wrote {args.out}: {len(db)} x {feats.shape[1]} features")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
