#!/usr/bin/env python
"""Convert a raw re-id dataset into LMDBs (train, val, probe, gallery) and a JSON file per split.

    python tools/convert_dataset.py market1501 RAW_DIR OUT_DIR [--val-ids 50]
    python tools/convert_dataset.py cuhk03 RAW_DIR OUT_DIR [--variant labeled|detected]
                                    [--protocol classic|new] [--split 0..19] [--val-ids 100]
    python tools/convert_dataset.py cuhk01 RAW_DIR OUT_DIR [--test-ids 100|486] [--split K]
                                    [--val-ids 20]
    common: [--seed 0] [--encoded] [--input-size 144x56]

market1501: RAW_DIR holds bounding_box_train/, bounding_box_test/, query/ (the official release,
  or the output of tools/make_synthetic.py).
cuhk03: RAW_DIR holds cuhk-03.mat (or cuhk03_release/cuhk-03.mat); --protocol new also needs
  cuhk03_new_protocol_config_<variant>.mat beside it. Classic: the --split-th official test set.
cuhk01: RAW_DIR holds campus/ (PPPPIII.png); --split K draws the K-th seeded random split.
Images are resized to 160 x 64 as Caffe's convert_imageset does (for a network input of
--input-size HxW, to that size scaled by 160/144 and 64/56: 71 x 27 for 64 x 24); databases are
written under a temporary name and renamed when complete.
"""
import argparse
import os
import sys
import time

from mspcnn.cli import add_input_size_argument, run
from mspcnn.data.datasets import convert_cuhk01, convert_cuhk03, convert_market1501
from mspcnn.data.transformer import image_size_for


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=["market1501", "cuhk03", "cuhk01"], help="the dataset's layout")
    p.add_argument("raw_dir", help="the dataset as released (see docs/evaluation.md)")
    p.add_argument("out_dir", help="the folder to write (replaced as a whole when it exists)")
    p.add_argument("--val-ids", type=int, default=None,
                   help="training identities held out for validation (default 50 / 100 / 20)")
    p.add_argument("--variant", choices=["labeled", "detected"], default="labeled", help="cuhk03")
    p.add_argument("--protocol", choices=["classic", "new"], default="classic", help="cuhk03")
    p.add_argument("--split", type=int, default=0, help="cuhk03 classic split / cuhk01 random split")
    p.add_argument("--test-ids", type=int, default=100, choices=[100, 486], help="cuhk01 protocol")
    p.add_argument("--seed", type=int, default=0,
               help="seed of the validation identities and of CUHK01's split (default 0)")
    p.add_argument("--encoded", action="store_true", help="store PNG-encoded images (smaller, slower)")
    add_input_size_argument(p, help="the network input the databases are for, height x width (default 144x56, "
                            "[1]'s: images stored at 160 x 64); the images are stored at it scaled by 160/144 "
                            "and 64/56")
    args = p.parse_args(argv)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        p.error(f"{args.out_dir} exists and is not a folder")
    if args.val_ids is not None and args.val_ids < 0:
        p.error(f"--val-ids must be >= 0, got {args.val_ids}")
    if args.split < 0:
        p.error(f"--split must be >= 0, got {args.split}")
    enc = "png" if args.encoded else None
    size = {"image_size": image_size_for(args.input_size)}
    start = time.time()
    try:
        if args.dataset == "market1501":
            summary = convert_market1501(args.raw_dir, args.out_dir, 50 if args.val_ids is None else args.val_ids,
                                         args.seed, enc, **size)
        elif args.dataset == "cuhk03":
            summary = convert_cuhk03(args.raw_dir, args.out_dir, args.variant, args.split, args.protocol,
                                     100 if args.val_ids is None else args.val_ids, args.seed, enc, **size)
        else:
            summary = convert_cuhk01(args.raw_dir, args.out_dir, args.test_ids, args.split,
                                     20 if args.val_ids is None else args.val_ids, args.seed, enc, **size)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{args.dataset} -> {args.out_dir} in {time.time() - start:.1f} s")
    print(f"{'split':<8} {'images':>7} {'ids':>5}")
    for split, (images, ids) in summary.items():
        print(f"{split:<8} {images:>7} {ids:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
