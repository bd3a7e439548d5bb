#!/usr/bin/env python
"""Generate the synthetic pedestrian dataset (Market-1501 layout).

    python tools/make_synthetic.py OUT_DIR [--train-ids 200] [--test-ids 200] [--cameras 6]
                                   [--distractors 100] [--junk 40] [--seed 0]

See mspcnn/data/synthetic.py for what is drawn. The output converts with
`python tools/convert_dataset.py market1501 OUT_DIR DB_DIR`.
"""
import argparse
import os
import sys

from mspcnn.cli import run
from mspcnn.data.synthetic import make_synthetic_market


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the folder to write (Market-1501 layout)")
    p.add_argument("--train-ids", type=int, default=200, help="training identities (default 200)")
    p.add_argument("--test-ids", type=int, default=200, help="test identities (default 200)")
    p.add_argument("--cameras", type=int, default=6, help="cameras (default 6)")
    p.add_argument("--distractors", type=int, default=100,
               help="distractor images in the gallery, identity 0000 (default 100)")
    p.add_argument("--junk", type=int, default=40, help="junk images in the gallery, identity -1 (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything drawn (default 0)")
    args = p.parse_args(argv)
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
        p.error(f"{args.out_dir} exists and is not empty; choose a new folder")
    try:
        summary = make_synthetic_market(args.out_dir, args.train_ids, args.test_ids, args.cameras,
                                        distractors=args.distractors, junk=args.junk, seed=args.seed)
    except ValueError as exc:
        p.error(str(exc))
    except OSError as exc:  # a folder that cannot be created, a full disk
        print(f"error: cannot write the dataset to {args.out_dir}: {exc}", file=sys.stderr)
        return 2
    print("synthetic dataset written to", args.out_dir)
    for k, v in summary.items():
        print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
