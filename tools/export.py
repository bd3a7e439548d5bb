#!/usr/bin/env python
"""Export the deploy net (one branch, image -> fc7_bn feature) for use outside mspcnn.

    python tools/export.py --weights W.caffemodel --format onnx --out mspcnn.onnx [--check IMAGE_DIR]
    python tools/export.py --weights W.caffemodel --format caffe --out DIR [--check IMAGE_DIR]

* onnx: an ONNX model (opset 17) with input `data` (N x 3 x 144 x 56: BGR, mean (102, 102, 101)
  subtracted, centre crop of a 160 x 64 image; N free; --input-size for weights trained at another size) and output `fc7_bn` (N x 256, not yet
  L2-normalised, as mspcnn's feature before normalisation). Needs the optional package `onnx`;
  --check also needs `onnxruntime`.
* caffe: DIR/mspcnn_deploy.prototxt and DIR/mspcnn_deploy.caffemodel, the deploy net of
  prototxt_equiv/ with the weights (BatchNorm statistics included, and the BatchNorm eps the
  training net used), which Caffe's `Net` loads by layer name.

--check IMAGE_DIR compares the exported model with mspcnn on the images of a folder (any size;
resized to 160 x 64 as the databases are): ONNX Runtime's features, or every blob of the exported
Caffe net run by mspcnn's independent prototxt interpreter (mspcnn.caffe.net, Caffe's semantics),
must equal mspcnn's within 1e-5 relative to the largest value. Without it, a few random images.
"""
import argparse
import glob
import os
import sys
import warnings

import numpy as np
import torch

from mspcnn.caffe import io as cio
from mspcnn.caffe.net import CaffeNet
from mspcnn.caffe.weights import layer_blobs_to_net
from mspcnn.cli import add_input_size_argument, run
from mspcnn.runtime import add_threads_argument, configure_threads
from mspcnn.data.transformer import feature_transformer, image_size_for, read_image_for
from mspcnn.model import feature_model
from mspcnn.paths import DEPLOY_PROTOTXT


class _Deploy(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, data):
        return self.backbone(data, logits=False)["fc7_bn"]


def check_images(folder, input_size, limit=64):
    """Images of ``folder`` (or random ones), N x 3 x H x W uint8, resized to the stored size of
    ``input_size`` (image_size_for: 160 x 64 for [1]'s 144 x 56), for the centre crop."""
    image_size = image_size_for(input_size)
    if folder is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (8, 3) + image_size).astype(np.uint8), "8 random images"
    paths = sorted(p for ext in ("jpg", "jpeg", "png", "bmp") for p in glob.glob(os.path.join(folder, "**", f"*.{ext}"),
                                                                                recursive=True))[:limit]
    if not paths:
        raise FileNotFoundError(f"--check {folder}: no images found")
    try:
        images = [read_image_for(p, input_size) for p in paths]
    except ValueError as exc:
        raise ValueError(f"--check: {exc}") from None
    return np.stack(images), f"{len(paths)} images of {folder}"


def export_onnx(backbone, out):
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError("--format onnx needs the optional package onnx: pip install onnx onnxruntime") from None
    model = _Deploy(backbone).eval()
    dummy = torch.zeros((2, 3) + backbone.input_size)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # the shape checks become constants
    torch.onnx.export(model, (dummy,), out, input_names=["data"], output_names=["fc7_bn"],
                      dynamic_axes={"data": {0: "batch"}, "fc7_bn": {0: "batch"}}, opset_version=17, dynamo=False)


def check_onnx(backbone, out, x):
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("--check of an ONNX model needs the optional package onnxruntime") from None
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    theirs = session.run(["fc7_bn"], {"data": x.numpy()})[0]
    with torch.no_grad():
        ours = backbone(x, logits=False)["fc7_bn"].numpy()
    return {"fc7_bn": float(np.abs(theirs - ours).max() / np.abs(ours).max())}


def export_caffe(backbone, weights, out_dir):
    template = cio.read_prototxt(DEPLOY_PROTOTXT)
    for lp in template.layer:  # the size the weights were trained at
        if lp.type == "Input":
            lp.input_param.shape[0].dim[2:] = list(backbone.input_size)
    trained = {lp.name: lp for lp in cio.read_caffemodel(weights).layer}
    for lp in template.layer:  # the BatchNorm settings the network was trained with
        if lp.type == "BatchNorm" and lp.name in trained and trained[lp.name].HasField("batch_norm_param"):
            bp = trained[lp.name].batch_norm_param
            if bp.HasField("eps"):
                lp.batch_norm_param.eps = bp.eps
    os.makedirs(out_dir, exist_ok=True)
    prototxt = os.path.join(out_dir, "mspcnn_deploy.prototxt")
    cio.write_prototxt(template, prototxt)
    caffemodel = os.path.join(out_dir, "mspcnn_deploy.caffemodel")
    cio.write_caffemodel(layer_blobs_to_net(backbone.layer_blobs(), template), caffemodel)
    return prototxt, caffemodel


def check_caffe(backbone, prototxt, caffemodel, x):
    net = CaffeNet(prototxt, "TEST").load_caffemodel(caffemodel)
    blobs = {}
    hooks = []
    for name, mod in backbone.named_children():  # record every module's output by layer name
        hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: blobs.__setitem__(n, o.detach())))
    with torch.no_grad():
        backbone(x, logits=False)
        theirs = net({"data": x})
    for h in hooks:
        h.remove()
    errors = {}
    for lp in net.layer_params:
        # layers whose top no later layer rewrites in place (BatchNorm's is rewritten by Scale and ReLU)
        if lp.name in blobs and lp.top and lp.top[0] in theirs and lp.type in ("Convolution", "Pooling",
                                                                                 "InnerProduct"):
            ours, ref = blobs[lp.name], theirs[lp.top[0]]
            if ours.shape == ref.shape:
                errors[lp.name] = float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    with torch.no_grad():
        ours = backbone(x, logits=False)["fc7_bn"]
    errors["fc7_bn (after Scale)"] = float((ours - theirs["fc7_bn"]).abs().max() / theirs["fc7_bn"].abs().max())
    return errors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a .caffemodel (a training snapshot or deploy weights)")
    p.add_argument("--format", required=True, choices=("onnx", "caffe"), help="onnx: one .onnx file; caffe: a "
                   "deploy prototxt and caffemodel")
    p.add_argument("--out", required=True, help="the .onnx file, or the folder of the Caffe files")
    p.add_argument("--check", metavar="IMAGE_DIR", help="compare the export with mspcnn on these images")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest relative difference accepted (1e-5)")
    add_input_size_argument(p)
    add_threads_argument(p)
    args = p.parse_args(argv)
    print(f"cpu: {configure_threads(args.threads)}", file=sys.stderr, flush=True)
    if args.format == "onnx" and os.path.isdir(args.out):
        p.error(f"--out {args.out} is a folder; give the .onnx file name")
    if args.format == "caffe" and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} exists and is not a folder")
    backbone = feature_model(args.weights, "cpu", input_size=args.input_size)
    images, what = check_images(args.check, backbone.input_size)
    x = torch.from_numpy(feature_transformer(backbone.input_size)(list(images)))
    if args.format == "onnx":
        export_onnx(backbone, args.out)
        errors = check_onnx(backbone, args.out, x)
        print(f"wrote {args.out}")
    else:
        prototxt, caffemodel = export_caffe(backbone, args.weights, args.out)
        errors = check_caffe(backbone, prototxt, caffemodel, x)
        print(f"wrote {prototxt} and {caffemodel}")
    worst = max(errors.items(), key=lambda kv: kv[1])
    print(f"check on {what}: {len(errors)} outputs compared, largest relative difference {worst[1]:.2e} ({worst[0]})")
    if worst[1] > args.tolerance:
        print(f"error: the export differs from mspcnn by {worst[1]:.2e} (> {args.tolerance:g}) at {worst[0]}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
