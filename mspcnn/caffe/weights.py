"""Weights by Caffe layer name, shared by :class:`mspcnn.caffe.net.CaffeNet`
and the hand-written MSP-CNN model: both expose ``layer_blobs()``, an ordered
{layer name: [tensors in Caffe's blob order]} (Convolution/InnerProduct:
weight, bias; BatchNorm: mean_acc, var_acc, factor; Scale: gamma, beta)."""
import os

import numpy as np
import torch

from . import io as cio

__all__ = ["load_layer_blobs", "layer_blobs_to_net"]


def load_layer_blobs(layer_blobs, source, strict=True):
    """Copy blobs from a .caffemodel (path or NetParameter) into ``layer_blobs``.

    Every layer and shape is checked before anything is copied: a mismatch
    raises CaffeFormatError naming the layer and both shapes and leaves the
    tensors unchanged. ``strict``: every layer of ``layer_blobs`` must be in
    the file (extra layers in the file are ignored, as Caffe does); otherwise the layers the file
    lacks keep their values. Returns the names of the layers skipped (empty when strict)."""
    is_path = isinstance(source, (str, os.PathLike))
    model = cio.read_caffemodel(source) if is_path else source
    where = os.fspath(source) if is_path else "caffemodel"
    by_name = {lp.name: lp for lp in model.layer}
    plan, skipped = [], []
    for name, tensors in layer_blobs.items():
        if name not in by_name:
            if strict:
                missing = [n for n in layer_blobs if n not in by_name]
                raise cio.CaffeFormatError(
                    f"{where}: no layer {name!r} in the file" + (f" (and {len(missing) - 1} more layers missing)"
                                                                  if len(missing) > 1 else "")
                    + "; is it the weights of this network?")
            skipped.append(name)
            continue
        blobs = by_name[name].blobs
        if len(blobs) != len(tensors):
            raise cio.CaffeFormatError(f"{where}: layer {name!r} has {len(blobs)} blobs, the "
                                       f"model expects {len(tensors)}")
        for i, (blob, t) in enumerate(zip(blobs, tensors)):
            arr = cio.blob_to_array(blob)
            if arr.size != t.numel() or (arr.ndim > 1 and tuple(arr.shape) != tuple(t.shape)):
                raise cio.CaffeFormatError(
                    f"{where}: layer {name!r} blob {i} has shape {list(arr.shape)}, the model "
                    f"expects {list(t.shape)}")
            plan.append((t, arr))
    with torch.no_grad():
        for t, arr in plan:
            t.copy_(torch.from_numpy(np.ascontiguousarray(arr)).reshape(t.shape).to(t.dtype))
    return skipped


BLOB_TYPES = ("Convolution", "InnerProduct", "BatchNorm", "Scale")


def layer_blobs_to_net(layer_blobs, template):
    """A NetParameter holding ``template``'s layers (a NetParameter, its
    layer definitions) with the blobs of ``layer_blobs`` attached by name.
    Layers of a type that has blobs but that ``layer_blobs`` lacks (e.g. the
    second branch of a Siamese template, whose blobs are shared by name) are
    left out, so that the file never holds a layer with missing blobs."""
    from . import proto

    out = proto.NetParameter()
    out.CopyFrom(template)
    del out.layer[:]
    for layer in template.layer:
        if layer.type in BLOB_TYPES and layer.name not in layer_blobs:
            continue
        new = out.layer.add()
        new.CopyFrom(layer)
        del new.blobs[:]
        for t in layer_blobs.get(layer.name, []):
            new.blobs.append(cio.array_to_blob(t.detach().cpu().numpy()))
    return out
