"""The MSP-CNN network (docs/method.md) with Caffe's semantics.

Every module is registered under its Caffe layer name (``conv1``, ``conv1_bn``, ``conv1_scale``,
``inception_1a/3x3_reduce``, ``fc7``, ...), so ``model.named_modules()`` reads like
``prototxt_equiv/mspcnn_deploy.prototxt`` and weights move to and from ``.caffemodel`` files by
name. Each convolution (and fc7) is followed by Caffe's BatchNorm, a Scale with bias, and a ReLU;
pooling uses Caffe's rounding.

* :class:`MSPCNNBackbone`: one branch, image -> pool1 maps, fc7_bn features, (optionally) fc8
  logits.
* :class:`MSPCNN`: the Siamese net of the paper: two images per pair through one set of
  parameters, softmax on the anchor, Caffe's ContrastiveLoss on the L2-normalised fc7_bn features
  (high level) and the NCC loss on the pool1 maps (low level, stage 2).

The topology is written here, by hand, once. Each builder also writes the Caffe definition of its
layer (a ``LayerParameter``): the fillers and learning-rate multipliers of [1] (Xiao et al., CVPR
2016), the loss layers with Caffe's defaults. The model is built *from* those definitions, so a
caller may pass its own (``layer_params``, e.g. read from a prototxt by :mod:`mspcnn.train_net`):
the fillers, multipliers, BatchNorm settings, dropout ratio, loss weights and loss parameters of
those definitions are what the model uses. :meth:`MSPCNN.describe` returns the whole definition
as a ``NetParameter``, the equivalent of ``prototxt_equiv/mspcnn_train_val.prototxt``.
"""
import operator
from collections import OrderedDict

import torch
from torch import nn

from mspcnn.caffe import layers as L
from mspcnn.caffe.kernels import bn_scale, paired_bn_scale
from mspcnn.caffe import proto
from mspcnn.caffe.weights import layer_blobs_to_net, load_layer_blobs
from mspcnn.data.transformer import CROP, INPUT_SHAPE
from mspcnn.losses import ncc_loss

__all__ = ["MSPCNNBackbone", "MSPCNN", "caffe_float32", "training_arithmetic", "feature_model", "OPTIONAL_LAYERS", "TRAIN_BATCH_PAIRS",
           "check_input_size", "map_sizes"]

# [1] trains with batches of 50 (x iter_size 2): the batch of the Input layer of describe().
TRAIN_BATCH_PAIRS = 50
# Layers the training net may leave out: a loss (and what only it reads) that is not used.
OPTIONAL_LAYERS = ("loss_cls", "loss_high", "fc7_norm", "fc7_norm_p", "loss_low")


def caffe_float32():
    """Make CUDA convolutions and matrix products true float32, as Caffe's are. PyTorch lets cuDNN
    use TF32 (10-bit mantissa) on Ampere and later GPUs by default, which changes results at the
    1e-3 level; the training and feature tools call this before using a GPU."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def training_arithmetic(tf32=False, autotune=True):
    """How a GPU computes a training run: convolutions and matrix products in float32, as Caffe's
    (:func:`caffe_float32`), or with ``tf32`` in TF32 tensor cores (inputs rounded to a 10-bit
    mantissa, float32 sums; several times faster on Ampere and later); ``autotune``: cuDNN times its
    algorithms on the first batch of each shape and keeps the fastest (``cudnn.benchmark``; off for
    deterministic runs)."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.benchmark = bool(autotune)


def feature_model(weights, device="cpu", allow_partial=False, input_size=CROP):
    """The one-branch network for features (:class:`MSPCNNBackbone` without fc8) with ``weights``
    (a .caffemodel of a training snapshot or a deploy net), in eval mode on ``device``. Every layer
    must be in the file unless ``allow_partial``; then the skipped layers (which keep their initial
    values: their features are not trustworthy) are in ``model.skipped_layers``. ``input_size``:
    the (height, width) the net was trained at ([1]'s 144 x 56 by default; a .caffemodel does not
    record it). Raises FileNotFoundError or CaffeFormatError naming the file."""
    if device.startswith("cuda"):
        caffe_float32()
    model = MSPCNNBackbone(input_size=input_size).load_caffemodel(weights, strict=not allow_partial)
    return model.to(device).eval()


def map_sizes(size):
    """The (height, width) of the maps of the net for an input of ``size`` (height, width):
    {"pool1": ..., "inception_1b": ..., "inception_2b": ..., "inception_3b": ...}, with Caffe's
    rounding; None where an inception_*b block's branches disagree (its stride-2 convolutions give
    floor((x - 1) / 2) + 1, its 3 x 3 max pool ceil((x + 2 pad - 3) / 2) + 1, which agree only for
    some x: the reason [1]'s 3b pool pads the width by 1 for 144 x 56)."""
    sizes = {"pool1": tuple(L.pool_output_size(x, 2, 2, 0) for x in size)}
    x = sizes["pool1"]
    for name, pad in (("inception_1b", (0, 0)), ("inception_2b", (0, 0)), ("inception_3b", (0, 1))):
        conv = tuple((v - 1) // 2 + 1 for v in x)
        pool = tuple(L.pool_output_size(v, 3, 2, p) for v, p in zip(x, pad))
        if conv != pool or min(conv) < 1:
            sizes[name] = None
            break
        x = sizes[name] = conv
    return sizes


def check_input_size(size):
    """(height, width) of the network's input, checked: two ints for which every layer's output
    is defined (:func:`map_sizes`): a height of 16 k or 16 k - 1 (k >= 1) and a width of 16 k + 8
    or 16 k + 7 (k >= 0). The last pooling is global, so the topology takes any such size;
    [1] uses 144 x 56, and a smaller input trades accuracy for speed (the work goes with the
    number of pixels). Returns the tuple; raises ValueError naming the nearest size that works."""
    try:
        h, w = (operator.index(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"input size: expected (height, width) integers, got {size!r}") from None
    if h > 0 and w > 0 and None not in map_sizes((h, w)).values():
        return h, w

    def near(v, fits):  # the nearest size that fits (the larger one on a tie)
        return min((c for c in range(1, 2 * max(v, 1) + 32) if fits(c)), key=lambda c: (abs(c - v), -c))

    hint = near(h, lambda c: c % 16 == 0), near(w, lambda c: c % 16 == 8)
    raise ValueError(f"input size {h} x {w}: the inception blocks of the network need a height of 16k or 16k-1 "
                     f"and a width of 16k+8 or 16k+7 ([1]'s is 144 x 56); the nearest is {hint[0]} x {hint[1]}")


# ------------------------------------------------------------------ layer definitions
def _filler(kind, **kw):
    return proto.FillerParameter(type=kind, **kw)


def _spec(name, lr_mult, decay_mult):
    return proto.ParamSpec(name=name, lr_mult=lr_mult, decay_mult=decay_mult)


def _layer_def(name, kind, bottom, top, **fields):
    lp = proto.LayerParameter(name=name, type=kind)
    lp.bottom.extend([bottom] if isinstance(bottom, str) else bottom)
    lp.top.extend([top] if isinstance(top, str) else top)
    for key, value in fields.items():
        if isinstance(value, list):
            getattr(lp, key).extend(value)
        else:
            getattr(lp, key).CopyFrom(value)
    return lp


def _has(msg, field):
    return msg.HasField(field)


def loss_weight(lp):
    """A loss layer's weight (Caffe: the first ``loss_weight``, 1 when not given)."""
    return float(lp.loss_weight[0]) if lp.loss_weight else 1.0


class MSPCNNBackbone(nn.Module):
    """One branch of MSP-CNN (the network of [1], as docs/method.md reconstructs it); the outputs
    below are for [1]'s 144 x 56 input (``input_size``; :func:`map_sizes` gives them for another):

    ======================  =====================================  ==============
    module                  layers                                 output
    ======================  =====================================  ==============
    conv1, conv2, conv3     3x3 conv (32) + BN + Scale + ReLU      32 x 144 x 56
    pool1                   max 2x2 stride 2                       32 x 72 x 28
    inception_1a            1x1 | 1x1>3x3 | 1x1>3x3>3x3 | avg>1x1  256 x 72 x 28
    inception_1b            1x1>3x3/2 | 1x1>3x3>3x3/2 | max 3/2    384 x 36 x 14
    inception_2a / 2b       as 1a / 1b with 128                    512 / 768
    inception_3a / 3b       as 1a / 1b with 256 (3b pool pad_w 1)  1024 / 1536 x 9 x 4
    global_pool             average 9 x 4                          1536
    fc7                     fc 256 + BN + Scale (-> fc7_bn)        256
                            + ReLU + dropout 0.5
    fc8                     fc num_classes (optional)              num_classes
    ======================  =====================================  ==============

    Args:
        num_classes: identities of the training set (fc8); None for no fc8.
        generator: torch.Generator for the fillers (xavier weights, constant 0.2 biases, fc8
            gaussian 0.001, as in [1], unless ``layer_params`` say otherwise).
        layer_params: {layer name: LayerParameter} replacing the built-in definitions (their
            fillers, ParamSpec multipliers, BatchNorm settings and dropout ratio are used; their
            structure must be the built-in one, which :mod:`mspcnn.train_net` checks).
        input_size: (height, width) of the images (:func:`check_input_size`); [1]'s 144 x 56.

    ``layer_params`` (attribute): the definitions of this branch's layers, in Caffe order;
    ``caffe_layers``: their (name, type). ``cpu_kernels`` (property, default True): on the CPU, run
    each BatchNorm + Scale (+ ReLU) of the training phase as one C++ operator and pooling through
    PyTorch's channels-last kernels with our MAX backward (:mod:`mspcnn.caffe.kernels`: the same
    functions, BatchNorm's sums in double); False runs PyTorch's separate operations (what a GPU
    runs).
    """

    def __init__(self, num_classes=None, generator=None, layer_params=None, input_size=CROP):
        super().__init__()
        self.input_size = check_input_size(input_size)
        self.num_classes = num_classes
        self._cpu_kernels = True
        self._given = dict(layer_params or {})
        self._gen = generator
        self.layer_params = OrderedDict()
        self._channels = {"data": INPUT_SHAPE[0]}

        x = "data"
        for name in ("conv1", "conv2", "conv3"):
            x = self._conv_bn(name, x, 32, 3, 1, 1)
        x = self._pool("pool1", x, "MAX", 2, 2)
        x = self._inception_a("inception_1a", x, 64)
        x = self._inception_b("inception_1b", x, 64)
        x = self._inception_a("inception_2a", x, 128)
        x = self._inception_b("inception_2b", x, 128)
        x = self._inception_a("inception_3a", x, 256)
        x = self._inception_b("inception_3b", x, 256, pool_pad=(0, 1))
        x = self._pool("global_pool", x, "AVE", global_pooling=True)
        x = self._fc("fc7", x, 256, _filler("xavier"), _filler("constant", value=0.2))
        x = self._bn_scale("fc7", x)
        self.dropout_ratio = None
        if num_classes:
            self._layer(_layer_def("relu7", "ReLU", x, "fc7_relu"))
            drop = self._layer(_layer_def("drop7", "Dropout", "fc7_relu", "fc7_relu",
                                          dropout_param=proto.DropoutParameter(dropout_ratio=0.5)))
            self.dropout_ratio = float(drop.dropout_param.dropout_ratio)
            self._channels["fc7_relu"] = self._channels[x]
            self._fc("fc8", "fc7_relu", num_classes, _filler("gaussian", std=0.001), _filler("constant"))
        self.feature_dim = 256
        del self._given

    @property
    def caffe_layers(self):
        """(Caffe layer name, type) of every layer of this branch, in prototxt order."""
        return [(name, lp.type) for name, lp in self.layer_params.items()]

    # -------------------------------------------------------------- builders
    def _layer(self, lp):
        """Register a layer's definition: the caller's (``layer_params``) replaces the built-in
        one of the same name."""
        lp = self._given.get(lp.name, lp)
        self.layer_params[lp.name] = lp
        return lp

    def _learnable(self, lp, module, fillers):
        """Fill a module's weight and bias with ``fillers`` (Caffe's fillers; None is a constant
        0) and give them the lr_mult / decay_mult of the layer's ParamSpecs (Caffe's default 1/1
        when not given)."""
        blobs = [module.weight] + ([module.bias] if getattr(module, "bias", None) is not None else [])
        for i, (p, filler) in enumerate(zip(blobs, fillers)):
            L.fill_(p, filler, self._gen)
            spec = lp.param[i] if i < len(lp.param) else proto.ParamSpec()
            p.lr_mult, p.decay_mult = float(spec.lr_mult), float(spec.decay_mult)

    def _conv_bn(self, name, bottom, cout, k, s, p):
        """Convolution + BatchNorm + Scale + ReLU (in place); returns the top blob."""
        lp = self._layer(_layer_def(
            name, "Convolution", bottom, name,
            param=[_spec(f"{name}_w", 1, 1), _spec(f"{name}_b", 2, 0)],
            convolution_param=proto.ConvolutionParameter(
                num_output=cout, kernel_size=[k], stride=[s], pad=[p], weight_filler=_filler("xavier"),
                bias_filler=_filler("constant", value=0.2))))
        cp = lp.convolution_param
        conv = nn.Conv2d(self._channels[bottom], cout, k, s, p)
        self._learnable(lp, conv, [cp.weight_filler if _has(cp, "weight_filler") else None,
                                   cp.bias_filler if _has(cp, "bias_filler") else None])
        self.add_module(name, conv)
        self._channels[name] = cout
        top = self._bn_scale(name, name)
        self._layer(_layer_def(f"{name}_relu", "ReLU", top, top))
        return top

    def _bn_scale(self, name, bottom):
        """Caffe's BatchNorm (top ``<name>_bn``) and a Scale with bias in place (the affine part;
        [1] learns it at lr 1 without weight decay); returns the top blob."""
        top = f"{name}_bn"
        lp = self._layer(_layer_def(top, "BatchNorm", bottom, top))
        self.add_module(top, batch_norm_from(lp, self._channels[bottom]))
        lp = self._layer(_layer_def(f"{name}_scale", "Scale", top, top,
                                    param=[_spec(f"{name}_scale_g", 1, 0), _spec(f"{name}_scale_b", 1, 0)],
                                    scale_param=proto.ScaleParameter(bias_term=True)))
        sp = lp.scale_param
        scale = L.Scale(self._channels[bottom], bias_term=True)
        # Caffe's Scale layer fills gamma with 1 and beta with 0 unless told otherwise.
        self._learnable(lp, scale, [sp.filler if _has(sp, "filler") else _filler("constant", value=1.0),
                                    sp.bias_filler if _has(sp, "bias_filler") else None])
        self.add_module(f"{name}_scale", scale)
        self._channels[top] = self._channels[bottom]
        return top

    def _pool(self, name, bottom, method, k=None, s=None, pad=(0, 0), global_pooling=False):
        pp = proto.PoolingParameter(pool=method)
        if global_pooling:
            pp.global_pooling = True
        else:
            pp.kernel_size, pp.stride = k, s
            if pad[0] == pad[1]:
                if pad[0]:
                    pp.pad = pad[0]
            else:
                pp.pad_h, pp.pad_w = pad
        self._layer(_layer_def(name, "Pooling", bottom, name, pooling_param=pp))
        kernel = (k, k) if k else (1, 1)
        stride = (s, s) if s else (1, 1)
        self.add_module(name, L.Pooling(method, kernel, stride, tuple(pad), global_pooling))
        self._channels[name] = self._channels[bottom]
        return name

    def _concat(self, name, bottoms):
        self._layer(_layer_def(name, "Concat", bottoms, name))
        self._channels[name] = sum(self._channels[b] for b in bottoms)
        return name

    def _fc(self, name, bottom, cout, wfill, bfill):
        lp = self._layer(_layer_def(
            name, "InnerProduct", bottom, name,
            param=[_spec(f"{name}_w", 1, 1), _spec(f"{name}_b", 2, 0)] if name != "fc8"
            else [proto.ParamSpec(lr_mult=1, decay_mult=1), proto.ParamSpec(lr_mult=2, decay_mult=0)],
            inner_product_param=proto.InnerProductParameter(num_output=cout, weight_filler=wfill,
                                                            bias_filler=bfill)))
        ip = lp.inner_product_param
        fc = nn.Linear(self._channels[bottom], cout)
        self._learnable(lp, fc, [ip.weight_filler if _has(ip, "weight_filler") else None,
                                 ip.bias_filler if _has(ip, "bias_filler") else None])
        self.add_module(name, fc)
        self._channels[name] = cout
        return name

    def _inception_a(self, name, x, width):
        """Four branches of `width` channels at the same resolution."""
        b1 = self._conv_bn(f"{name}/1x1", x, width, 1, 1, 0)
        b2 = self._conv_bn(f"{name}/3x3_reduce", x, width, 1, 1, 0)
        b2 = self._conv_bn(f"{name}/3x3", b2, width, 3, 1, 1)
        b3 = self._conv_bn(f"{name}/double_3x3_reduce", x, width, 1, 1, 0)
        b3 = self._conv_bn(f"{name}/double_3x3_1", b3, width, 3, 1, 1)
        b3 = self._conv_bn(f"{name}/double_3x3_2", b3, width, 3, 1, 1)
        b4 = self._pool(f"{name}/pool", x, "AVE", 3, 1, (1, 1))
        b4 = self._conv_bn(f"{name}/pool_proj", b4, width, 1, 1, 0)
        return self._concat(f"{name}/output", [b1, b2, b3, b4])

    def _inception_b(self, name, x, width, pool_pad=(0, 0)):
        """Two strided branches of `width` channels and a max pool passing the input."""
        b1 = self._conv_bn(f"{name}/3x3_reduce", x, width, 1, 1, 0)
        b1 = self._conv_bn(f"{name}/3x3", b1, width, 3, 2, 1)
        b2 = self._conv_bn(f"{name}/double_3x3_reduce", x, width, 1, 1, 0)
        b2 = self._conv_bn(f"{name}/double_3x3_1", b2, width, 3, 1, 1)
        b2 = self._conv_bn(f"{name}/double_3x3_2", b2, width, 3, 2, 1)
        b3 = self._pool(f"{name}/pool", x, "MAX", 3, 2, pool_pad)
        return self._concat(f"{name}/output", [b1, b2, b3])

    @property
    def cpu_kernels(self):
        """Whether the CPU runs our paths for BatchNorm + Scale + ReLU and pooling (mspcnn.caffe.kernels)."""
        return self._cpu_kernels

    @cpu_kernels.setter
    def cpu_kernels(self, value):
        self._cpu_kernels = bool(value)
        L.set_pool_kernels(self, self._cpu_kernels)

    # --------------------------------------------------------------- forward
    def m(self, name):
        """The module registered under Caffe layer name ``name``."""
        return self._modules[name]

    def _normalise(self, name, scale, x, bn, relu):
        if isinstance(bn, PairedBranches):  # both branches interleaved in x: each its own statistics
            return paired_bn_scale(self.m(name), bn.second_or(name, self.m(name)), self.m(scale), x, relu,
                                   kernel=self._cpu_kernels)
        norm = self.m(name) if bn is None else bn[name]
        return bn_scale(norm, self.m(scale), x, relu=relu, kernel=self._cpu_kernels)

    def conv_bn_relu(self, name, x, bn=None):
        """``bn``: {BatchNorm layer name: module} to use instead of this branch's own (the second
        branch of the Siamese net keeps its own statistics), or :class:`PairedBranches` (``x``
        holds both branches' images interleaved)."""
        x = self.m(name)(x)
        return self._normalise(f"{name}_bn", f"{name}_scale", x, bn, relu=True)

    def inception_a(self, name, x, bn=None):
        b1 = self.conv_bn_relu(f"{name}/1x1", x, bn)
        b2 = self.conv_bn_relu(f"{name}/3x3", self.conv_bn_relu(f"{name}/3x3_reduce", x, bn), bn)
        b3 = self.conv_bn_relu(f"{name}/double_3x3_reduce", x, bn)
        b3 = self.conv_bn_relu(f"{name}/double_3x3_2", self.conv_bn_relu(f"{name}/double_3x3_1", b3, bn), bn)
        b4 = self.conv_bn_relu(f"{name}/pool_proj", self.m(f"{name}/pool")(x), bn)
        return torch.cat([b1, b2, b3, b4], dim=1)

    def inception_b(self, name, x, bn=None):
        b1 = self.conv_bn_relu(f"{name}/3x3", self.conv_bn_relu(f"{name}/3x3_reduce", x, bn), bn)
        b2 = self.conv_bn_relu(f"{name}/double_3x3_reduce", x, bn)
        b2 = self.conv_bn_relu(f"{name}/double_3x3_2", self.conv_bn_relu(f"{name}/double_3x3_1", b2, bn), bn)
        return torch.cat([b1, b2, self.m(f"{name}/pool")(x)], dim=1)

    def forward(self, x, dropout_mask=None, logits=True, bn=None):
        """``x``: N x 3 x ``input_size`` images. Returns an OrderedDict with ``pool1`` (N x 32 x
        72 x 28 at 144 x 56), ``fc7_bn`` (N x 256, the test feature before L2 normalisation) and,
        with fc8 and ``logits``, ``fc8`` (N x num_classes logits). ``bn``: see
        :meth:`conv_bn_relu`."""
        want = (INPUT_SHAPE[0], *self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"MSPCNNBackbone: expected N x {' x '.join(map(str, want))} "
                             f"images, got {list(x.shape)}")
        # The 40 BatchNorm layers' accumulator updates are made together at the end of the pass
        # (five multi-tensor calls instead of about 280 operations, each a kernel launch on a GPU).
        with L.deferred_accumulation():
            return self._forward(x, dropout_mask, logits, bn)

    def _forward(self, x, dropout_mask, logits, bn):
        out = OrderedDict()
        for name in ("conv1", "conv2", "conv3"):
            x = self.conv_bn_relu(name, x, bn)
        x = out["pool1"] = self.m("pool1")(x)
        x = self.inception_a("inception_1a", x, bn)
        x = self.inception_b("inception_1b", x, bn)
        x = self.inception_a("inception_2a", x, bn)
        x = self.inception_b("inception_2b", x, bn)
        x = self.inception_a("inception_3a", x, bn)
        x = self.inception_b("inception_3b", x, bn)
        x = self.m("global_pool")(x).flatten(1)
        x = self.m("fc7")(x)
        x = out["fc7_bn"] = self._normalise("fc7_bn", "fc7_scale", x, bn, relu=False)
        if self.num_classes and logits:
            out["fc8"] = self.head(x, dropout_mask)
        return out

    def head(self, fc7_bn, dropout_mask=None):
        """fc8's logits from fc7_bn: ReLU, dropout (``dropout_mask`` if given), fc8."""
        return self.m("fc8")(L.dropout(torch.relu(fc7_bn), self.dropout_ratio, self.training, dropout_mask))

    # --------------------------------------------------------------- weights
    def layer_blobs(self):
        """{Caffe layer name: [tensors in Caffe blob order]} (see mspcnn.caffe.weights)."""
        out = OrderedDict()
        for name in self.layer_params:
            mod = self._modules.get(name)
            if isinstance(mod, L.BatchNorm):
                out[name] = [mod.mean_acc, mod.var_acc, mod.factor]
            elif isinstance(mod, (nn.Conv2d, nn.Linear, L.Scale)):
                out[name] = [mod.weight, mod.bias]
        return out

    def load_caffemodel(self, source, strict=True):
        """Import weights (BatchNorm accumulators included) by layer name; checked before anything
        is copied. ``strict`` (default): every layer must be in the file; otherwise the layers it
        lacks keep their values and are listed in ``self.skipped_layers``."""
        self.skipped_layers = load_layer_blobs(self.layer_blobs(), source, strict)
        return self

    def save_caffemodel(self, path, prototxt=None):
        """Export weights as a .caffemodel whose layers are those of ``prototxt`` (default:
        prototxt_equiv/mspcnn_deploy.prototxt)."""
        from mspcnn.caffe import io as cio
        from mspcnn.paths import DEPLOY_PROTOTXT

        template = cio.read_prototxt(prototxt or DEPLOY_PROTOTXT)
        cio.write_caffemodel(layer_blobs_to_net(self.layer_blobs(), template), path)

    def param_groups(self):
        """Parameters with their Caffe lr_mult / decay_mult, for the solver."""
        return [{"params": [p], "name": n, "lr_mult": getattr(p, "lr_mult", 1.0),
                 "decay_mult": getattr(p, "decay_mult", 1.0)} for n, p in self.named_parameters()]


def batch_norm_from(lp, channels):
    """A :class:`mspcnn.caffe.layers.BatchNorm` with the settings of a BatchNorm layer definition
    (eps, moving_average_fraction, use_global_stats; Caffe's defaults when not given)."""
    bp = lp.batch_norm_param
    return L.BatchNorm(channels, eps=float(bp.eps), moving_average_fraction=float(bp.moving_average_fraction),
                       use_global_stats=bp.use_global_stats if _has(bp, "use_global_stats") else None)


def _second_branch(lp):
    """The second branch's copy of a first-branch layer: names and blobs end in "_p" (the input
    ``data`` becomes ``data_p``), parameters shared by their ParamSpec names; BatchNorm has no
    ParamSpecs, so each branch keeps its own statistics (what Caffe 1.0 does, see docs/method.md)."""
    out = proto.LayerParameter()
    out.CopyFrom(lp)
    out.name = lp.name + "_p"
    out.bottom[:] = ["data_p" if b == "data" else b + "_p" for b in lp.bottom]
    out.top[:] = [t + "_p" for t in lp.top]
    return out


class PairedBranches:
    """The ``bn`` argument of :class:`MSPCNNBackbone` for a batch that holds both branches' images
    interleaved (anchor 0, partner 0, anchor 1, ...): the first of each pair is normalised by the
    backbone's BatchNorm layers, the second by ``second`` ({layer name: module}; None: the same
    layers, shared statistics), each with its own batch statistics."""

    def __init__(self, second):
        self.second = second

    def second_or(self, name, first):
        return first if self.second is None else self.second[name]


class MSPCNN(nn.Module):
    """The Siamese MSP-CNN with its three losses (docs/method.md, "Losses").

    forward(img_a, img_b, label_a, similar) runs the two images of each pair through the same
    parameters as two separate batches (on a GPU as one batch with the pairs interleaved, each
    branch still normalised by its own BatchNorm statistics: ``pair_branches``, the same function in
    half the operations) and returns the losses:

    * ``cls``: SoftmaxWithLoss of fc8 on the anchor images (``label_a``);
    * ``high``: ContrastiveLoss (margin ``margin``) on the L2-normalised fc7_bn features,
      ``similar`` the pair labels (1 same identity, 0 not);
    * ``low``: the NCC loss on the pool1 maps (``use_low``: stage 2), with ``ncc_params`` (patch,
      search_rows, eps, pos_floor, neg_ceiling, balance_pairs);
    * ``total``: the weighted sum (weights ``w_cls``, ``w_high``, ``w_low``).

    BatchNorm: each branch normalises with its own batch statistics and keeps its own running
    statistics (layers ``conv1_bn`` and ``conv1_bn_p`` ...), as real Caffe 1.0 does with
    prototxt_equiv/mspcnn_train_val.prototxt; features use the first branch's. ``share_bn_stats``
    makes the second branch accumulate into the first branch's statistics instead (what Caffe does
    when the net is given inline with three named ParamSpecs per BatchNorm), and
    ``merge_bn_batches`` runs the two images as one batch (not Caffe's Siamese net; for
    experiments).

    Configuration: ``layer_params`` ({layer name: LayerParameter}, the whole training net, e.g.
    from :func:`mspcnn.train_net.read_train_net`) replaces the built-in definitions; a loss layer
    it lacks is not computed. The keyword arguments ``margin``, ``w_cls``, ``w_high``, ``w_low``,
    ``ncc_params`` and ``dropout`` edit those definitions (None: keep them). ``use_low`` defaults
    to whether ``layer_params`` has the loss_low layer (False without ``layer_params``: stage 1).
    ``input_size``: (height, width) of the images (:func:`check_input_size`; [1]'s 144 x 56).
    """

    def __init__(self, num_classes, margin=None, w_cls=None, w_high=None, w_low=None, use_low=None,
                 ncc_params=None, merge_bn_batches=False, dropout=None, generator=None, layer_params=None,
                 share_bn_stats=False, input_size=CROP):
        super().__init__()
        given = None if layer_params is None else {k: _copy(v) for k, v in layer_params.items()}
        canon = _loss_defs()
        if given is None:
            active = set(canon)
            given = {}
        else:
            active = {name for name in canon if name in given}
        defs = {name: given.get(name, canon[name]) for name in canon}
        _edit(defs, "loss_cls", w_cls, lambda lp, v: lp.loss_weight.__setitem__(slice(None), [v]))
        _edit(defs, "loss_high", w_high, lambda lp, v: lp.loss_weight.__setitem__(slice(None), [v]))
        _edit(defs, "loss_low", w_low, lambda lp, v: lp.loss_weight.__setitem__(slice(None), [v]))
        _edit(defs, "loss_high", margin, lambda lp, v: setattr(lp.contrastive_loss_param, "margin", v))
        for key, value in (ncc_params or {}).items():
            _edit(defs, "loss_low", value, lambda lp, v, k=key: setattr(lp.ncc_loss_param, k, v))
        if dropout is not None:
            drop = given.get("drop7")
            if drop is None:
                drop = given["drop7"] = _layer_def("drop7", "Dropout", "fc7_relu", "fc7_relu")
            drop.dropout_param.dropout_ratio = dropout

        self.backbone = MSPCNNBackbone(num_classes, generator=generator, layer_params=given, input_size=input_size)
        self.share_bn_stats = share_bn_stats
        self.bn_p = nn.ModuleDict()
        self.branch_p = OrderedDict()
        for name, lp in self.backbone.layer_params.items():
            if name in ("relu7", "drop7", "fc8"):
                continue
            plp = given.get(name + "_p", _second_branch(lp))
            self.branch_p[plp.name] = plp
            if lp.type == "BatchNorm" and not share_bn_stats:
                self.bn_p[plp.name] = batch_norm_from(plp, self.backbone.m(name).channels)
        self.loss_defs = defs
        self.active_losses = active
        self.w_cls = loss_weight(defs["loss_cls"]) if "loss_cls" in active else 0.0
        self.w_high = loss_weight(defs["loss_high"]) if "loss_high" in active else 0.0
        self.w_low = loss_weight(defs["loss_low"])
        cp = defs["loss_high"].contrastive_loss_param
        self.margin, self.legacy_version = float(cp.margin), bool(cp.legacy_version)
        lossp = defs["loss_cls"].loss_param
        self.softmax_normalization = proto.LossParameter.NormalizationMode.Name(lossp.normalization)
        if _has(lossp, "normalize") and not _has(lossp, "normalization"):
            self.softmax_normalization = "VALID" if lossp.normalize else "BATCH_SIZE"
        self.softmax_ignore_label = lossp.ignore_label if _has(lossp, "ignore_label") else None
        npar = defs["loss_low"].ncc_loss_param
        self.ncc_params = dict(patch=int(npar.patch), search_rows=int(npar.search_rows), eps=float(npar.eps),
                               pos_floor=float(npar.pos_floor), neg_ceiling=float(npar.neg_ceiling),
                               balance_pairs=bool(npar.balance_pairs))
        self.use_low = ("loss_low" in active and layer_params is not None) if use_low is None else use_low
        self.merge_bn_batches = merge_bn_batches
        # Both branches in one interleaved pass (PairedBranches): None = on GPUs (the same function;
        # tests compare it with two passes in float64), True / False to choose.
        self.pair_branches = None

    def _bn_second(self):
        if self.share_bn_stats:
            return None
        return {name[:-2]: mod for name, mod in self.bn_p.items()}

    def forward(self, img_a, img_b, label_a, similar, dropout_mask=None):
        if img_a.shape != img_b.shape:
            raise ValueError(f"MSPCNN: the two images of each pair must have one shape, got "
                             f"{list(img_a.shape)} and {list(img_b.shape)}")
        if self.merge_bn_batches:
            if dropout_mask is not None:
                dropout_mask = torch.cat([dropout_mask, torch.ones_like(dropout_mask)])
            both = self.backbone(torch.cat([img_a, img_b]), dropout_mask)
            n = img_a.shape[0]
            fa = {k: v[:n] for k, v in both.items()}
            fb = {k: v[n:] for k, v in both.items()}
        elif self.pair_branches if self.pair_branches is not None else img_a.is_cuda:
            # One pass over both branches' images, interleaved: the same function (each branch
            # normalised by its own BatchNorm statistics, paired_bn_scale), half the operations of
            # two passes (each a kernel launch on a GPU, where an iteration is bound by the host).
            both = self.backbone(torch.stack([img_a, img_b], 1).flatten(0, 1), logits=False,
                                 bn=PairedBranches(self._bn_second()))
            fa = {k: v[0::2] for k, v in both.items()}
            fb = {k: v[1::2] for k, v in both.items()}
            if self.backbone.num_classes:
                fa["fc8"] = self.backbone.head(fa["fc7_bn"], dropout_mask)
        else:
            fa = self.backbone(img_a, dropout_mask)
            fb = self.backbone(img_b, logits=False, bn=self._bn_second())  # fc8: anchors only
        losses = OrderedDict()
        total = 0.0
        if "loss_cls" in self.active_losses:
            losses["cls"] = L.softmax_with_loss(fa["fc8"], label_a, self.softmax_normalization,
                                                self.softmax_ignore_label)
            total = total + self.w_cls * losses["cls"]
        if "loss_high" in self.active_losses:
            losses["high"] = L.contrastive_loss(L.l2_normalize(fa["fc7_bn"]), L.l2_normalize(fb["fc7_bn"]),
                                                similar, self.margin, self.legacy_version)
            total = total + self.w_high * losses["high"]
        if self.use_low:
            losses["low"] = ncc_loss(fa["pool1"], fb["pool1"], similar, **self.ncc_params)
            total = total + self.w_low * losses["low"]
        if not torch.is_tensor(total):
            raise ValueError("MSPCNN: the net has no loss layer")
        losses["total"] = total
        return losses

    # ------------------------------------------------------------ definition
    def describe(self, batch_pairs=TRAIN_BATCH_PAIRS):
        """The training net this model computes, as a Caffe ``NetParameter``: the Input layer of
        the pairs, both branches (the second sharing parameters by name), fc8 and the loss layers
        (loss_low included in the stage "stage2"). The equivalent of
        prototxt_equiv/mspcnn_train_val.prototxt (tests/test_model.py compares them)."""
        net = proto.NetParameter(name="MSP-CNN_train_val")
        image = proto.BlobShape(dim=[batch_pairs, INPUT_SHAPE[0], *self.backbone.input_size])
        vector = proto.BlobShape(dim=[batch_pairs])
        net.layer.append(_layer_def("pairs", "Input", [], ["data", "data_p", "label", "sim"],
                                    input_param=proto.InputParameter(shape=[image, image, vector, vector])))
        head = ("relu7", "drop7", "fc8")
        net.layer.extend(_copy(lp) for name, lp in self.backbone.layer_params.items() if name not in head)
        net.layer.extend(_copy(lp) for lp in self.branch_p.values())
        net.layer.extend(_copy(self.backbone.layer_params[name]) for name in head)
        for name in ("loss_cls", "fc7_norm", "fc7_norm_p", "loss_high", "loss_low"):
            if name in self.active_losses or name == "loss_low":
                net.layer.append(_copy(self.loss_defs[name]))
        return net

    # --------------------------------------------------------------- weights
    def layer_blobs(self):
        """{layer name: [tensors]} of the training net: the backbone's, and the second branch's
        BatchNorm statistics (its other layers share the backbone's blobs)."""
        out = self.backbone.layer_blobs()
        for name, mod in self.bn_p.items():
            out[name] = [mod.mean_acc, mod.var_acc, mod.factor]
        return out

    def load_caffemodel(self, source, strict=True):
        """Import weights by layer name. The backbone's layers must be in the file (``strict``);
        the second branch's BatchNorm statistics are copied when the file has them (a deploy
        .caffemodel has not: they keep their initial zeros, as Caffe leaves a layer the file lacks).
        Returns the names of the second-branch layers the file lacked."""
        from mspcnn.caffe import io as cio

        net = cio.read_caffemodel(source) if not isinstance(source, proto.NetParameter) else source
        present = {lp.name for lp in net.layer}
        self.backbone.load_caffemodel(net, strict)
        second = {name: [mod.mean_acc, mod.var_acc, mod.factor] for name, mod in self.bn_p.items()
                  if name in present}
        load_layer_blobs(second, net, strict=True)
        return sorted(set(self.bn_p) - present)

    def param_groups(self):
        return self.backbone.param_groups()


def _copy(lp):
    out = proto.LayerParameter()
    out.CopyFrom(lp)
    return out


def _edit(defs, name, value, setter):
    if value is not None:
        setter(defs[name], value)


def _loss_defs():
    """The built-in definitions of the loss layers (Caffe's defaults for everything not written;
    mspcnn.defaults for the NCC loss)."""
    return OrderedDict([
        ("loss_cls", _layer_def("loss_cls", "SoftmaxWithLoss", ["fc8", "label"], "loss_cls", loss_weight=[1.0])),
        ("fc7_norm", _layer_def("fc7_norm", "L2Normalize", "fc7_bn", "fc7_norm")),
        ("fc7_norm_p", _layer_def("fc7_norm_p", "L2Normalize", "fc7_bn_p", "fc7_norm_p")),
        ("loss_high", _layer_def("loss_high", "ContrastiveLoss", ["fc7_norm", "fc7_norm_p", "sim"], "loss_high",
                                 loss_weight=[1.0])),
        ("loss_low", _layer_def("loss_low", "NCCLoss", ["pool1", "pool1_p", "sim"], "loss_low", loss_weight=[1.0],
                                include=[proto.NetStateRule(phase=0, stage=["stage2"])])),
    ])
