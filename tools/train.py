#!/usr/bin/env python
"""Train MSP-CNN as `caffe train` would: the solver's net is the model (mspcnn.engine.solve).

    python tools/train.py --solver prototxt_equiv/solver_stage1.prototxt --data DB_DIR
                          [--weights W.caffemodel | --snapshot S.solverstate] [--device cpu|cuda]
                          [--max-iter N] [--base-lr R] [--batch-pairs N] [--input-size HxW]
                          [--loss-weights CLS HIGH LOW]
                          [--snapshot-prefix P] [--snapshot-every N] [--test-interval N] [--display N]
                          [--seed N] [--workers N] [--deterministic] [--tf32] [--cuda-graphs]
                          [--sigint-effect stop|snapshot|none] [--sighup-effect stop|snapshot|none]

* DB_DIR is the output of tools/convert_dataset.py (train.lmdb/json, val.lmdb/json).
* The solver prototxt gives the optimisation (base_lr, lr_policy, momentum, weight_decay,
  iter_size, max_iter, display, average_loss, snapshot, snapshot_prefix, test_interval,
  random_seed) and names the net (net: or net_param, with train_state stages: solver_stage2 adds
  the stage "stage2", which includes the NCC loss layer). The net is what trains: edit a loss
  weight, the contrastive margin, an NCCLoss parameter, the dropout ratio, a BatchNorm setting, a
  filler or a multiplier in prototxt_equiv/mspcnn_train_val.prototxt (or a copy the solver names)
  and that is what runs. Options on the command line override the solver (and --loss-weights the
  net's loss weights).
* Stage 1 trains from scratch; stage 2 starts from stage 1's weights (--weights).
* --snapshot resumes from a .solverstate (and the .caffemodel beside it): the same weights, bit for
  bit, as an uninterrupted run (on a GPU add --deterministic).
* Logs follow Caffe's format, so existing log parsers work; each "Iteration N (...)" line also says
  iterations done / total and an ETA. A progress bar is drawn on stderr when it is a terminal.
* Signals as the caffe tool: SIGINT stops (after a snapshot), SIGHUP snapshots and goes on, SIGTERM
  stops (after a snapshot). Exit status: 0 done, 2 bad input, 130 stopped by a signal.
* Data-parallel: `torchrun --nproc_per_node N tools/train.py ...` trains on N workers as Caffe's
  multi-GPU training does (NCCL on GPUs, gloo on CPUs): each worker its own batches, gradients
  averaged over the workers, one update, one log and one set of snapshots (mspcnn.engine).
"""
import argparse
import sys

from mspcnn.caffe.io import CaffeFormatError
from mspcnn.cli import add_device_argument, add_input_size_argument, run
from mspcnn.runtime import (add_cuda_graphs_argument, add_tf32_argument, add_threads_argument,
                            add_workers_argument, configure_threads, machine_record, machine_text)
from mspcnn.engine import SIGNAL_EFFECTS, TrainingError, solve
from mspcnn.train_net import NetDefinitionError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solver", required=True, help="solver prototxt (names the net)")
    p.add_argument("--data", required=True, help="a folder written by tools/convert_dataset.py")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--weights", help="initial weights (.caffemodel), e.g. stage 1's result")
    start.add_argument("--snapshot", help="resume from this .solverstate")
    add_device_argument(p)
    p.add_argument("--max-iter", type=int, help="overrides the solver's max_iter")
    p.add_argument("--base-lr", type=float, help="overrides the solver's base_lr (e.g. for small batches)")
    p.add_argument("--iter-size", type=int, help="overrides the solver's iter_size (forward/backward passes per "
                   "update, per worker)")
    p.add_argument("--loss-weights", type=float, nargs=3, metavar=("CLS", "HIGH", "LOW"),
                   help="replace the net's loss weights of loss_cls, loss_high and loss_low (a loss the "
                        "stage does not have must be given 0)")
    p.add_argument("--batch-pairs", type=int,
                   help="pairs per forward pass (default: the batch of the net's Input layer, 50)")
    add_input_size_argument(p, default=None, help="the images' height x width (default: the net's Input layer's, "
                            "144x56 in prototxt_equiv/); the database should hold images of it scaled by 160/144 "
                            "and 64/56 (convert_dataset.py --input-size)")
    add_workers_argument(p)
    p.add_argument("--snapshot-prefix", help="overrides the solver's snapshot_prefix")
    p.add_argument("--snapshot-every", type=int, help="overrides the solver's snapshot (0: only at the end)")
    p.add_argument("--test-interval", type=int, help="overrides the solver's test_interval (0: never)")
    p.add_argument("--display", type=int, help="overrides the solver's display")
    p.add_argument("--seed", type=int, help="overrides the solver's random_seed (initialisation, pair "
                   "sampling, crops and mirroring, dropout)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (torch.use_deterministic_algorithms), so that runs and "
                   "resumes on a GPU are bit for bit reproducible; slower. CPU runs always are")
    add_tf32_argument(p)
    add_cuda_graphs_argument(p)
    p.add_argument("--sigint-effect", choices=SIGNAL_EFFECTS, default="stop",
                   help="what SIGINT (Ctrl-C) does, as caffe's -sigint_effect (default stop)")
    p.add_argument("--sighup-effect", choices=SIGNAL_EFFECTS, default="snapshot",
                   help="what SIGHUP does, as caffe's -sighup_effect (default snapshot)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    print(f"cpu: {configure_threads(args.threads)}", file=sys.stderr, flush=True)
    print(f"machine: {machine_text(machine_record(args.device))}", file=sys.stderr, flush=True)
    if args.batch_pairs is not None and args.batch_pairs < 1:
        p.error(f"--batch-pairs must be >= 1, got {args.batch_pairs}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    return args


def main(argv=None):
    args = parse_args(argv)
    overrides = {"max_iter": args.max_iter, "base_lr": args.base_lr, "iter_size": args.iter_size, "snapshot_prefix": args.snapshot_prefix,
                 "snapshot": args.snapshot_every, "test_interval": args.test_interval, "display": args.display,
                 "random_seed": args.seed}
    loss_weights = None
    if args.loss_weights:
        loss_weights = {name: w for name, w in zip(("loss_cls", "loss_high", "loss_low"), args.loss_weights)}
    try:
        result = solve(args.solver, args.data, weights=args.weights, snapshot=args.snapshot, device=args.device,
                       overrides=overrides, batch_pairs=args.batch_pairs, input_size=args.input_size,
                       loss_weights=loss_weights,
                       workers=args.workers, deterministic=args.deterministic, tf32=args.tf32,
                       cuda_graphs=args.cuda_graphs, sigint_effect=args.sigint_effect, sighup_effect=args.sighup_effect)
    except (TrainingError, CaffeFormatError, NetDefinitionError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 130 if result.stopped_by else 0


if __name__ == "__main__":
    sys.exit(run(main))
