"""A Caffe net definition (``NetParameter``) run by PyTorch with Caffe's semantics.

:class:`CaffeNet` builds one module per layer of a prototxt for one phase
(include/exclude rules applied), infers every blob's shape, fills parameters
with the layers' fillers, shares parameters between layers by ``param { name }``
as Caffe does, and runs forward passes that return every blob by its Caffe
name -- including the ``<blob>_<layer>_<i>_split_<k>`` copies Caffe inserts for
blobs read by several layers, so that per-consumer gradients can be compared
with Caffe's. Weights are imported from and exported to ``.caffemodel`` files
by layer name.

Supported layer types: Input, Data, MemoryData (inputs), Convolution,
InnerProduct, BatchNorm, Scale, ReLU, Pooling, Concat, Flatten, Dropout,
SoftmaxWithLoss, ContrastiveLoss, and two types that BVLC Caffe lacks:
L2Normalize (each row divided by its L2 norm) and MSP-CNN's NCCLoss.
"""
import os
import re

import numpy as np
import torch
from torch import nn

from . import io as cio
from . import layers as L
from . import proto
from .weights import layer_blobs_to_net, load_layer_blobs

__all__ = ["CaffeNet", "NetDefinitionError", "SUPPORTED_TYPES", "pair_param"]

INPUT_TYPES = ("Input", "Data", "MemoryData")
LOSS_TYPES = ("SoftmaxWithLoss", "ContrastiveLoss", "NCCLoss")
SUPPORTED_TYPES = INPUT_TYPES + LOSS_TYPES + (
    "Convolution", "InnerProduct", "BatchNorm", "Scale", "ReLU", "Pooling", "Concat", "Flatten",
    "Dropout", "L2Normalize")


def _key(name):
    """Module key of a layer name (module names cannot contain '.')."""
    return name.replace(".", "\u2024")


class NetDefinitionError(ValueError):
    """A net definition that cannot be built: names the layer (and line, when known)."""


def _phase_name(phase):
    if isinstance(phase, str):
        if phase.upper() not in ("TRAIN", "TEST"):
            raise ValueError(f"phase must be 'TRAIN' or 'TEST', got {phase!r}")
        return phase.upper()
    return "TRAIN" if phase == 0 else "TEST"


def _included(lp, phase, stages=()):
    """Caffe's NetStateRule check for the phase and stages (levels unused):
    a rule is met when its phase (if set) matches, the net has all of its
    stages and none of its not_stages."""
    code = 0 if phase == "TRAIN" else 1

    def met(r):
        return ((not r.HasField("phase") or r.phase == code)
                and all(s in stages for s in r.stage)
                and not any(s in stages for s in r.not_stage))

    if lp.include:
        return any(met(r) for r in lp.include)
    if lp.exclude:
        return not any(met(r) for r in lp.exclude)
    return True


def pair_param(msg, single, h, w, default):
    """(h, w) of a Convolution's or Pooling's kernel/stride/pad: *_h/*_w, else the single or
    repeated value, else ``default``."""
    def given(name):
        return not msg.DESCRIPTOR.fields_by_name[name].is_repeated and msg.HasField(name)

    if given(h) or given(w):
        return int(getattr(msg, h)), int(getattr(msg, w))
    value = getattr(msg, single)
    if isinstance(value, int):
        has = msg.HasField(single)
        v = int(value) if has else default
        return v, v
    values = list(value)
    if not values:
        return default, default
    return (int(values[0]), int(values[0])) if len(values) == 1 else (int(values[0]), int(values[1]))


class CaffeNet(nn.Module):
    """A Caffe net for one phase.

    Args:
        net: a ``NetParameter`` (used as given), or the path of a prototxt (read as Caffe reads
            files, with its upgrades: see :func:`mspcnn.caffe.io.read_net`).
        phase: "TRAIN" or "TEST".
        input_shapes: shapes of the tops of Data/MemoryData layers (Input
            layers carry their own shapes), e.g. ``{"data": (50, 3, 144, 56)}``.
        generator: a torch.Generator for the fillers (seeded runs).
        stages: the net state's stages (Caffe's NetState.stage), for layers
            with ``include { stage: ... }`` rules.
    """

    def __init__(self, net, phase="TRAIN", input_shapes=None, generator=None, stages=()):
        super().__init__()
        self.source, self._text = None, None
        if isinstance(net, (str, os.PathLike)):
            self.source = os.fspath(net)
            net = cio.read_net(self.source)  # with Caffe's upgrades of files
            with open(self.source, encoding="utf-8") as f:
                self._text = f.read()
        self.net_param = net
        self.phase = _phase_name(phase)
        self.stages = tuple(stages)
        self.layer_params = [lp for lp in net.layer if _included(lp, self.phase, self.stages)]
        self.layer_modules = nn.ModuleDict()
        self.blob_shapes = {}
        self.input_blobs = []
        self.loss_weights = {}
        self._shared = {}
        self._param_specs = {}
        self._check_types()
        self._build(dict(input_shapes or {}), generator)
        self.train(self.phase == "TRAIN")

    # ------------------------------------------------------------------ build
    def _where(self, lp, index):
        """'layer NAME (type T, line L)' for messages."""
        line = None
        if self._text is not None:
            pattern = re.compile(r'name\s*:\s*"' + re.escape(lp.name) + r'"')
            for i, text_line in enumerate(self._text.splitlines(), 1):
                if pattern.search(text_line):
                    line = i
                    break
        src = f"{self.source}, line {line}: " if line else (f"{self.source}: " if self.source else "")
        return f"{src}layer {index} {lp.name!r} (type {lp.type!r})"

    def _check_types(self):
        for i, lp in enumerate(self.layer_params):
            if lp.type not in SUPPORTED_TYPES:
                raise NetDefinitionError(
                    f"{self._where(lp, i)}: unknown layer type {lp.type!r}; supported: "
                    + ", ".join(SUPPORTED_TYPES))

    def _param(self, lp, i, shape, filler, generator):
        """A parameter of layer lp (its i-th blob), shared by ParamSpec name."""
        spec = lp.param[i] if i < len(lp.param) else proto.ParamSpec()
        name = spec.name
        if name and name in self._shared:
            p = self._shared[name]
            if tuple(p.shape) != tuple(shape):
                raise NetDefinitionError(
                    f"layer {lp.name!r}: shared parameter {name!r} has shape {list(p.shape)} "
                    f"here {list(shape)}")
            return p
        p = nn.Parameter(torch.empty(shape))
        L.fill_(p, filler, generator)
        p.lr_mult, p.decay_mult = float(spec.lr_mult), float(spec.decay_mult)
        p.caffe_name = f"{lp.name}/{i}"
        if name:
            self._shared[name] = p
        return p

    def _weight_and_bias(self, lp, mod, param, generator):
        """The weight (blob 0) and optional bias (blob 1) of a Convolution or
        InnerProduct layer, filled by its fillers and shared by ParamSpec name."""
        def filler(name):
            return getattr(param, name) if param.HasField(name) else None

        mod.weight = self._param(lp, 0, mod.weight.shape, filler("weight_filler"), generator)
        if param.bias_term:
            mod.bias = self._param(lp, 1, mod.bias.shape, filler("bias_filler"), generator)

    def _build(self, input_shapes, generator):
        shapes = self.blob_shapes
        for idx, lp in enumerate(self.layer_params):
            where = self._where(lp, idx)
            missing = [b for b in lp.bottom if b not in shapes]
            if missing:
                raise NetDefinitionError(f"{where}: bottom blob(s) {missing} not produced by an "
                                         "earlier layer")
            bottoms = [shapes[b] for b in lp.bottom]
            t, mod, tops = lp.type, None, None
            if t == "Input":
                given = list(lp.input_param.shape)
                if len(given) not in (1, len(lp.top)):
                    raise NetDefinitionError(f"{where}: input_param needs 1 or {len(lp.top)} shapes")
                tops = [tuple(int(d) for d in given[min(i, len(given) - 1)].dim)
                        for i in range(len(lp.top))]
                self.input_blobs.extend(lp.top)
            elif t == "MemoryData" and lp.memory_data_param.batch_size and not all(
                    top in input_shapes for top in lp.top):
                mp = lp.memory_data_param
                tops = [(mp.batch_size, mp.channels, mp.height, mp.width), (mp.batch_size,)][:len(lp.top)]
                self.input_blobs.extend(lp.top)
            elif t in ("Data", "MemoryData"):
                tops = []
                for top in lp.top:
                    if top not in input_shapes:
                        raise NetDefinitionError(f"{where}: pass the shape of top {top!r} in "
                                                 "input_shapes")
                    tops.append(tuple(input_shapes[top]))
                self.input_blobs.extend(lp.top)
            elif t == "Convolution":
                cp = lp.convolution_param
                (n, c, h, w) = bottoms[0]
                kh, kw = pair_param(cp, "kernel_size", "kernel_h", "kernel_w", None)
                sh, sw = pair_param(cp, "stride", "stride_h", "stride_w", 1)
                ph, pw = pair_param(cp, "pad", "pad_h", "pad_w", 0)
                dh, dw = pair_param(cp, "dilation", "dilation", "dilation", 1) if cp.dilation else (1, 1)
                if kh is None:
                    raise NetDefinitionError(f"{where}: convolution_param needs kernel_size")
                groups = int(cp.group)
                mod = nn.Conv2d(c, int(cp.num_output), (kh, kw), (sh, sw), (ph, pw), (dh, dw),
                                groups=groups, bias=cp.bias_term)
                self._weight_and_bias(lp, mod, cp, generator)
                oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
                ow = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
                tops = [(n, int(cp.num_output), oh, ow)]
            elif t == "InnerProduct":
                ip = lp.inner_product_param
                if ip.axis != 1 or ip.transpose:
                    raise NetDefinitionError(f"{where}: only axis 1 without transpose is supported")
                fan_in = int(np.prod(bottoms[0][1:]))
                mod = nn.Linear(fan_in, int(ip.num_output), bias=ip.bias_term)
                self._weight_and_bias(lp, mod, ip, generator)
                tops = [(bottoms[0][0], int(ip.num_output))]
            elif t == "BatchNorm":
                bp = lp.batch_norm_param
                use_global = bp.use_global_stats if bp.HasField("use_global_stats") else self.phase == "TEST"
                share = lp.param[0].name if lp.param and lp.param[0].name else None
                if share and share in self._shared:
                    # Blobs shared by name: one set of accumulators, updated
                    # by every layer that uses it; each call still normalises
                    # with its own batch statistics.
                    mod = self._shared[share]
                    if mod.channels != bottoms[0][1]:
                        raise NetDefinitionError(f"{where}: shared BatchNorm {share!r} has "
                                                 f"{mod.channels} channels, here {bottoms[0][1]}")
                else:
                    mod = L.BatchNorm(bottoms[0][1], eps=bp.eps,
                                      moving_average_fraction=bp.moving_average_fraction,
                                      use_global_stats=use_global)
                    if share:
                        self._shared[share] = mod
                tops = [bottoms[0]]
            elif t == "Scale":
                sp = lp.scale_param
                if sp.axis != 1 or sp.num_axes != 1 or len(lp.bottom) != 1:
                    raise NetDefinitionError(f"{where}: only a learned per-channel scale "
                                             "(axis 1, num_axes 1, one bottom) is supported")
                c = bottoms[0][1]
                mod = L.Scale(c, bias_term=sp.bias_term)
                one = proto.FillerParameter(type="constant", value=1.0)
                mod.weight = self._param(lp, 0, (c,), sp.filler if sp.HasField("filler") else one,
                                         generator)
                if sp.bias_term:
                    mod.bias = self._param(lp, 1, (c,),
                                           sp.bias_filler if sp.HasField("bias_filler") else None,
                                           generator)
                tops = [bottoms[0]]
            elif t == "ReLU":
                if lp.relu_param.negative_slope != 0:
                    raise NetDefinitionError(f"{where}: negative_slope is not supported")
                tops = [bottoms[0]]
            elif t == "Pooling":
                pp = lp.pooling_param
                method = {0: "MAX", 1: "AVE"}.get(int(pp.pool))
                if method is None:
                    raise NetDefinitionError(f"{where}: only MAX and AVE pooling are supported")
                kernel = pair_param(pp, "kernel_size", "kernel_h", "kernel_w", None)
                if kernel[0] is None and not pp.global_pooling:
                    raise NetDefinitionError(f"{where}: pooling_param needs kernel_size")
                mod = L.Pooling(method, kernel, pair_param(pp, "stride", "stride_h", "stride_w", 1),
                                pair_param(pp, "pad", "pad_h", "pad_w", 0), pp.global_pooling)
                n, c, h, w = bottoms[0]
                tops = [(n, c) + mod.output_size(h, w)]
            elif t == "Concat":
                axis = lp.concat_param.axis
                base = list(bottoms[0])
                base[axis] = sum(s[axis] for s in bottoms)
                tops = [tuple(base)]
            elif t == "Flatten":
                tops = [(bottoms[0][0], int(np.prod(bottoms[0][1:])))]
            elif t in ("Dropout", "L2Normalize"):
                tops = [bottoms[0]]
            elif t in LOSS_TYPES:
                tops = [()]
                weight = lp.loss_weight[0] if lp.loss_weight else 1.0
                self.loss_weights[lp.top[0]] = float(weight)
            if len(tops) != len(lp.top):
                raise NetDefinitionError(f"{where}: expects {len(tops)} top(s), has {len(lp.top)}")
            if mod is not None:
                self.layer_modules[_key(lp.name)] = mod
            for name, shape in zip(lp.top, tops):
                shapes[name] = tuple(shape)
        # Consumers of each blob version, for Caffe's split blobs.
        self._plan = []
        version, producer, consumers = {}, {}, {}
        for lp in self.layer_params:
            reads = []
            for b in lp.bottom:
                key = (b, version.get(b, 0))
                consumers.setdefault(key, []).append(lp.name)
                reads.append(key)
            writes = []
            for i, t in enumerate(lp.top):
                version[t] = version.get(t, 0) + 1
                key = (t, version[t])
                producer[key] = (lp.name, i)
                writes.append(key)
            self._plan.append((lp, reads, writes))
        self._consumers, self._producer = consumers, producer

    # ---------------------------------------------------------------- forward
    def forward(self, inputs, dropout_masks=None, retain_grad=False):
        """Run the net. ``inputs`` maps input blob names to tensors. Returns
        every blob by Caffe name (split copies included). ``dropout_masks``
        maps Dropout layer names to 0/1 masks; ``retain_grad`` keeps .grad on
        every blob for inspection."""
        missing = [b for b in self.input_blobs if b not in inputs]
        if missing:
            raise ValueError(f"CaffeNet.forward: missing input blob(s) {missing}")
        blobs, current = {}, {}
        split_used = {}
        for lp, reads, writes in self._plan:
            bottoms = []
            for key in reads:
                t = current[key]
                users = self._consumers[key]
                if len(users) > 1:
                    k = split_used.get(key, 0)
                    split_used[key] = k + 1
                    prod, top_i = self._producer.get(key, (None, 0))
                    name = f"{key[0]}_{prod}_{top_i}_split_{k}"
                    t = t.clone()
                    if retain_grad and t.requires_grad:
                        t.retain_grad()
                    blobs[name] = t
                bottoms.append(t)
            tops = self._run_layer(lp, bottoms, inputs, dropout_masks or {})
            for key, t in zip(writes, tops):
                if retain_grad and t.requires_grad:
                    t.retain_grad()
                current[key] = t
                blobs[key[0]] = t
        return blobs

    def _run_layer(self, lp, bottoms, inputs, masks):
        t = lp.type
        mod = self.layer_modules[_key(lp.name)] if _key(lp.name) in self.layer_modules else None
        if t in INPUT_TYPES:
            outs = []
            for top in lp.top:
                x = inputs[top]
                want = self.blob_shapes[top]
                if tuple(x.shape[1:]) != tuple(want[1:]) or x.dim() != len(want):
                    raise ValueError(f"input {top!r}: expected shape N x {list(want[1:])} "
                                     f"(N free), got {list(x.shape)}")
                outs.append(x)
            return outs
        x = bottoms[0]
        if t in ("Convolution", "BatchNorm", "Scale", "Pooling"):
            return [mod(x)]
        if t == "InnerProduct":
            return [mod(x.flatten(1))]
        if t == "ReLU":
            return [torch.relu(x)]
        if t == "Concat":
            return [torch.cat(bottoms, dim=lp.concat_param.axis)]
        if t == "Flatten":
            return [x.flatten(1)]
        if t == "L2Normalize":
            return [L.l2_normalize(x)]
        if t == "Dropout":
            return [L.dropout(x, lp.dropout_param.dropout_ratio, self.training, masks.get(lp.name))]
        if t == "SoftmaxWithLoss":
            norm = proto.LossParameter.NormalizationMode.Name(lp.loss_param.normalization)
            if lp.loss_param.HasField("normalize") and not lp.loss_param.HasField("normalization"):
                norm = "VALID" if lp.loss_param.normalize else "BATCH_SIZE"
            ignore = lp.loss_param.ignore_label if lp.loss_param.HasField("ignore_label") else None
            return [L.softmax_with_loss(x, bottoms[1], norm, ignore)]
        if t == "ContrastiveLoss":
            cp = lp.contrastive_loss_param
            return [L.contrastive_loss(x, bottoms[1], bottoms[2], cp.margin, cp.legacy_version)]
        if t == "NCCLoss":
            from mspcnn.losses import ncc_loss

            p = lp.ncc_loss_param
            return [ncc_loss(x, bottoms[1], bottoms[2], patch=p.patch, search_rows=p.search_rows,
                             eps=p.eps, pos_floor=p.pos_floor, neg_ceiling=p.neg_ceiling,
                             balance_pairs=p.balance_pairs)]
        raise NetDefinitionError(f"layer {lp.name!r}: type {t!r} has no forward")  # unreachable

    def loss(self, blobs):
        """The weighted sum of the loss tops (Caffe's objective)."""
        return sum(w * blobs[name] for name, w in self.loss_weights.items())

    # ---------------------------------------------------------------- weights
    def layer_blobs(self):
        """{layer name: [tensors in Caffe blob order]} for layers with blobs."""
        out = {}
        for lp in self.layer_params:
            mod = self.layer_modules[_key(lp.name)] if _key(lp.name) in self.layer_modules else None
            if isinstance(mod, L.BatchNorm):
                out[lp.name] = [mod.mean_acc, mod.var_acc, mod.factor]
            elif isinstance(mod, (nn.Conv2d, nn.Linear, L.Scale)):
                out[lp.name] = [mod.weight] + ([mod.bias] if mod.bias is not None else [])
        return out

    def load_caffemodel(self, source, strict=True):
        """Copy weights by layer name from a ``.caffemodel`` (path or
        NetParameter); see :func:`mspcnn.caffe.weights.load_layer_blobs`."""
        load_layer_blobs(self.layer_blobs(), source, strict)
        return self

    def to_caffemodel(self):
        """A NetParameter with every layer of this phase and its blobs."""
        template = proto.NetParameter()
        template.CopyFrom(self.net_param)
        del template.layer[:]
        template.layer.extend(self.layer_params)
        return layer_blobs_to_net(self.layer_blobs(), template)

    def save_caffemodel(self, path):
        cio.write_caffemodel(self.to_caffemodel(), path)

    def param_groups(self, base_lr=1.0, weight_decay=0.0):
        """Parameters with their Caffe lr_mult and decay_mult (shared ones once)."""
        seen, groups = set(), []
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            groups.append({"params": [p], "lr_mult": getattr(p, "lr_mult", 1.0),
                           "decay_mult": getattr(p, "decay_mult", 1.0),
                           "name": getattr(p, "caffe_name", "")})
        return groups
