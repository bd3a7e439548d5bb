#!/usr/bin/env python
"""Convert a raw re-id dataset into LMDBs (train, val, probe, gallery) and a JSON file per split.

    python tools/convert_dataset.py market1501 RAW_DIR OUT_DIR [--val-ids 50] [--seed 0] [--encoded]

market1501: RAW_DIR holds bounding_box_train/, bounding_box_test/ and query/ (the official
release, or the output of tools/make_synthetic.py). Images are resized to 160 x 64 as Caffe's
convert_imageset does. (CUHK03 and CUHK01 converters are not written yet.)
"""
import argparse
import sys
import time

from mspcnn.data.datasets import convert_market1501


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=["market1501"])
    p.add_argument("raw_dir")
    p.add_argument("out_dir")
    p.add_argument("--val-ids", type=int, default=50, help="training identities held out for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoded", action="store_true", help="store PNG-encoded images (smaller, slower)")
    args = p.parse_args(argv)
    start = time.time()
    try:
        summary = convert_market1501(args.raw_dir, args.out_dir, args.val_ids, args.seed,
                                     "png" if args.encoded else None)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{args.dataset} -> {args.out_dir} in {time.time() - start:.1f} s")
    print(f"{'split':<8} {'images':>7} {'ids':>5}")
    for split, (images, ids) in summary.items():
        print(f"{split:<8} {images:>7} {ids:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
