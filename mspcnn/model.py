"""The MSP-CNN network (METHOD.md sections 1 and 3) with Caffe's semantics.

Every module is registered under its Caffe layer name (``conv1``,
``conv1_bn``, ``conv1_scale``, ``inception_1a/3x3_reduce``, ``fc7``, ...), so
``model.named_modules()`` reads like the prototxt in
``prototxt_equiv/mspcnn_deploy.prototxt`` and weights move to and from
``.caffemodel`` files by name. Each convolution (and fc7) is followed by
Caffe's BatchNorm, a Scale with bias, and a ReLU; pooling uses Caffe's
rounding.

* :class:`MSPCNNBackbone`: one branch, image -> pool1 maps, fc7_bn features,
  (optionally) fc8 logits.
* :class:`MSPCNN`: the Siamese net of the paper: two images per pair through
  one backbone (shared parameters), softmax on the anchor, Caffe's
  ContrastiveLoss on the L2-normalised fc7_bn features (high level) and the
  NCC loss on the pool1 maps (low level, stage 2).
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from mspcnn.caffe import layers as L
from mspcnn.caffe import proto
from mspcnn.caffe.weights import layer_blobs_to_net, load_layer_blobs
from mspcnn.data.transformer import DataTransformer
from mspcnn.losses import ncc_loss

__all__ = ["MSPCNNBackbone", "MSPCNN", "INPUT_SHAPE", "CROP", "MEAN_BGR", "caffe_float32", "feature_transformer"]


def caffe_float32():
    """Make CUDA convolutions and matrix products true float32, as Caffe's are. PyTorch lets cuDNN
    use TF32 (10-bit mantissa) on Ampere and later GPUs by default, which changes results at the
    1e-3 level; the training and feature tools call this before using a GPU."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


INPUT_SHAPE = (3, 144, 56)  # a 144 x 56 crop of a 160 x 64 image, BGR, mean subtracted
CROP = INPUT_SHAPE[1:]
MEAN_BGR = (102, 102, 101)  # per-channel mean subtracted from the images (prototxt_equiv)


def feature_transformer():
    """The TEST-phase transform of the network's input: the centre 144 x 56 crop, minus MEAN_BGR
    (as the deploy and train_val prototxts' test phase); for feature extraction."""
    return DataTransformer(CROP, MEAN_BGR, phase="TEST")


def _filler(kind, **kw):
    return proto.FillerParameter(type=kind, **kw)


class MSPCNNBackbone(nn.Module):
    """One branch of MSP-CNN (the network of Xiao et al., CVPR 2016, as METHOD.md
    reconstructs it):

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
        dropout: the dropout ratio after fc7.
        bn_eps, bn_maf: Caffe BatchNorm's eps and moving_average_fraction.
        generator: torch.Generator for the fillers (xavier weights, constant 0.2
            biases, fc8 gaussian 0.001, as in [1]).
    """

    def __init__(self, num_classes=None, dropout=0.5, bn_eps=1e-5, bn_maf=0.999, generator=None):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_ratio = dropout
        self._bn = dict(eps=bn_eps, moving_average_fraction=bn_maf)
        self._gen = generator
        # (caffe layer name, type) in prototxt order, for the layer list checks.
        self.caffe_layers = []

        c = INPUT_SHAPE[0]
        for name in ("conv1", "conv2", "conv3"):
            self._conv_bn(name, c, 32, 3, 1, 1)
            c = 32
        self._pool("pool1", "MAX", 2, 2, 0)
        c = self._inception_a("inception_1a", c, 64)
        c = self._inception_b("inception_1b", c, 64)
        c = self._inception_a("inception_2a", c, 128)
        c = self._inception_b("inception_2b", c, 128)
        c = self._inception_a("inception_3a", c, 256)
        c = self._inception_b("inception_3b", c, 256, pool_pad=(0, 1))
        self._pool("global_pool", "AVE", None, None, 0, global_pooling=True)
        self._fc("fc7", c, 256, _filler("xavier"), _filler("constant", value=0.2))
        self._bn_scale("fc7", 256)
        if num_classes:
            self.caffe_layers.append(("relu7", "ReLU"))
            self.caffe_layers.append(("drop7", "Dropout"))
            self._fc("fc8", 256, num_classes, _filler("gaussian", std=0.001), _filler("constant"))
        self.feature_dim = 256

    # -------------------------------------------------------------- builders
    def _add(self, name, module, kind):
        self.add_module(name, module)
        self.caffe_layers.append((name, kind))
        return module

    def _mults(self, module):
        """Caffe's ParamSpec of [1]: weights lr 1 decay 1, biases lr 2 decay 0."""
        module.weight.lr_mult, module.weight.decay_mult = 1.0, 1.0
        if getattr(module, "bias", None) is not None:
            module.bias.lr_mult, module.bias.decay_mult = 2.0, 0.0

    def _bn_scale(self, name, channels):
        self._add(f"{name}_bn", L.BatchNorm(channels, **self._bn), "BatchNorm")
        scale = self._add(f"{name}_scale", L.Scale(channels, bias_term=True), "Scale")
        # The BN affine part of [1] is learned at lr 1 without weight decay.
        scale.weight.lr_mult, scale.weight.decay_mult = 1.0, 0.0
        scale.bias.lr_mult, scale.bias.decay_mult = 1.0, 0.0

    def _conv_bn(self, name, cin, cout, k, s, p):
        conv = self._add(name, nn.Conv2d(cin, cout, k, s, p), "Convolution")
        L.fill_(conv.weight, _filler("xavier"), self._gen)
        L.fill_(conv.bias, _filler("constant", value=0.2), self._gen)
        self._mults(conv)
        self._bn_scale(name, cout)
        self.caffe_layers.append((f"{name}_relu", "ReLU"))

    def _pool(self, name, method, k, s, p, global_pooling=False):
        kernel = (k, k) if k else (1, 1)
        stride = (s, s) if s else (1, 1)
        pad = p if isinstance(p, tuple) else (p, p)
        self._add(name, L.Pooling(method, kernel, stride, pad, global_pooling), "Pooling")

    def _fc(self, name, cin, cout, wfill, bfill):
        fc = self._add(name, nn.Linear(cin, cout), "InnerProduct")
        L.fill_(fc.weight, wfill, self._gen)
        L.fill_(fc.bias, bfill, self._gen)
        self._mults(fc)

    def _inception_a(self, name, cin, width):
        """Four branches of `width` channels at the same resolution."""
        self._conv_bn(f"{name}/1x1", cin, width, 1, 1, 0)
        self._conv_bn(f"{name}/3x3_reduce", cin, width, 1, 1, 0)
        self._conv_bn(f"{name}/3x3", width, width, 3, 1, 1)
        self._conv_bn(f"{name}/double_3x3_reduce", cin, width, 1, 1, 0)
        self._conv_bn(f"{name}/double_3x3_1", width, width, 3, 1, 1)
        self._conv_bn(f"{name}/double_3x3_2", width, width, 3, 1, 1)
        self._pool(f"{name}/pool", "AVE", 3, 1, 1)
        self._conv_bn(f"{name}/pool_proj", cin, width, 1, 1, 0)
        self.caffe_layers.append((f"{name}/output", "Concat"))
        return 4 * width

    def _inception_b(self, name, cin, width, pool_pad=(0, 0)):
        """Two strided branches of `width` channels and a max pool passing the input."""
        self._conv_bn(f"{name}/3x3_reduce", cin, width, 1, 1, 0)
        self._conv_bn(f"{name}/3x3", width, width, 3, 2, 1)
        self._conv_bn(f"{name}/double_3x3_reduce", cin, width, 1, 1, 0)
        self._conv_bn(f"{name}/double_3x3_1", width, width, 3, 1, 1)
        self._conv_bn(f"{name}/double_3x3_2", width, width, 3, 2, 1)
        self._pool(f"{name}/pool", "MAX", 3, 2, pool_pad)
        self.caffe_layers.append((f"{name}/output", "Concat"))
        return 2 * width + cin

    # --------------------------------------------------------------- forward
    def m(self, name):
        """The module registered under Caffe layer name ``name``."""
        return self._modules[name]

    def conv_bn_relu(self, name, x):
        x = self.m(name)(x)
        x = self.m(f"{name}_scale")(self.m(f"{name}_bn")(x))
        return torch.relu(x)

    def inception_a(self, name, x):
        b1 = self.conv_bn_relu(f"{name}/1x1", x)
        b2 = self.conv_bn_relu(f"{name}/3x3", self.conv_bn_relu(f"{name}/3x3_reduce", x))
        b3 = self.conv_bn_relu(f"{name}/double_3x3_reduce", x)
        b3 = self.conv_bn_relu(f"{name}/double_3x3_2", self.conv_bn_relu(f"{name}/double_3x3_1", b3))
        b4 = self.conv_bn_relu(f"{name}/pool_proj", self.m(f"{name}/pool")(x))
        return torch.cat([b1, b2, b3, b4], dim=1)

    def inception_b(self, name, x):
        b1 = self.conv_bn_relu(f"{name}/3x3", self.conv_bn_relu(f"{name}/3x3_reduce", x))
        b2 = self.conv_bn_relu(f"{name}/double_3x3_reduce", x)
        b2 = self.conv_bn_relu(f"{name}/double_3x3_2", self.conv_bn_relu(f"{name}/double_3x3_1", b2))
        return torch.cat([b1, b2, self.m(f"{name}/pool")(x)], dim=1)

    def forward(self, x, dropout_mask=None, logits=True):
        """Returns an OrderedDict with ``pool1`` (N x 32 x 72 x 28), ``fc7_bn``
        (N x 256, the test feature before L2 normalisation) and, with fc8 and
        ``logits``, ``fc8`` (N x num_classes logits)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != INPUT_SHAPE:
            raise ValueError(f"MSPCNNBackbone: expected N x {' x '.join(map(str, INPUT_SHAPE))} "
                             f"images, got {list(x.shape)}")
        out = OrderedDict()
        for name in ("conv1", "conv2", "conv3"):
            x = self.conv_bn_relu(name, x)
        x = out["pool1"] = self.m("pool1")(x)
        x = self.inception_a("inception_1a", x)
        x = self.inception_b("inception_1b", x)
        x = self.inception_a("inception_2a", x)
        x = self.inception_b("inception_2b", x)
        x = self.inception_a("inception_3a", x)
        x = self.inception_b("inception_3b", x)
        x = self.m("global_pool")(x).flatten(1)
        x = self.m("fc7")(x)
        x = out["fc7_bn"] = self.m("fc7_scale")(self.m("fc7_bn")(x))
        if self.num_classes and logits:
            x = L.dropout(torch.relu(x), self.dropout_ratio, self.training, dropout_mask)
            out["fc8"] = self.m("fc8")(x)
        return out

    # --------------------------------------------------------------- weights
    def layer_blobs(self):
        """{Caffe layer name: [tensors in Caffe blob order]} (see mspcnn.caffe.weights)."""
        out = OrderedDict()
        for name, kind in self.caffe_layers:
            mod = self._modules.get(name)
            if isinstance(mod, L.BatchNorm):
                out[name] = [mod.mean_acc, mod.var_acc, mod.factor]
            elif isinstance(mod, (nn.Conv2d, nn.Linear, L.Scale)):
                out[name] = [mod.weight, mod.bias]
        return out

    def load_caffemodel(self, source, strict=True):
        """Import weights (BatchNorm accumulators included) by layer name;
        checked before anything is copied."""
        load_layer_blobs(self.layer_blobs(), source, strict)
        return self

    def save_caffemodel(self, path, prototxt=None):
        """Export weights as a .caffemodel whose layers are those of
        ``prototxt`` (default: prototxt_equiv/mspcnn_deploy.prototxt)."""
        from mspcnn.caffe import io as cio
        from mspcnn.paths import DEPLOY_PROTOTXT

        template = cio.read_prototxt(prototxt or DEPLOY_PROTOTXT)
        cio.write_caffemodel(layer_blobs_to_net(self.layer_blobs(), template), path)

    def param_groups(self):
        """Parameters with their Caffe lr_mult / decay_mult, for the solver."""
        return [{"params": [p], "name": n, "lr_mult": getattr(p, "lr_mult", 1.0),
                 "decay_mult": getattr(p, "decay_mult", 1.0)} for n, p in self.named_parameters()]


class MSPCNN(nn.Module):
    """The Siamese MSP-CNN with its three losses (METHOD.md section 3).

    forward(img_a, img_b, label_a, similar) runs the two images of each pair
    through the same backbone -- as two separate batches, so each branch
    normalises with its own batch statistics, as Caffe's two-branch net does
    (``merge_bn_batches=True`` runs them as one batch instead) -- and returns
    the losses:

    * ``cls``: SoftmaxWithLoss of fc8 on the anchor images (``label_a``);
    * ``high``: ContrastiveLoss (margin ``margin``) on the L2-normalised
      fc7_bn features, ``similar`` the pair labels (1 same identity, 0 not);
    * ``low``: the NCC loss on the pool1 maps (``use_low``: stage 2), with
      ``ncc_params`` (patch, search_rows, eps, pos_floor, neg_ceiling);
    * ``total``: the weighted sum (weights ``w_cls``, ``w_high``, ``w_low``).
    """

    def __init__(self, num_classes, margin=1.0, w_cls=1.0, w_high=1.0, w_low=1.0, use_low=False,
                 ncc_params=None, merge_bn_batches=False, dropout=0.5, generator=None):
        super().__init__()
        self.backbone = MSPCNNBackbone(num_classes, dropout=dropout, generator=generator)
        self.margin = margin
        self.w_cls, self.w_high, self.w_low = w_cls, w_high, w_low
        self.use_low = use_low
        self.ncc_params = dict(patch=5, search_rows=5, eps=0.01, pos_floor=-1.0, neg_ceiling=1.0)
        self.ncc_params.update(ncc_params or {})
        self.merge_bn_batches = merge_bn_batches

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
        else:
            fa = self.backbone(img_a, dropout_mask)
            fb = self.backbone(img_b, logits=False)  # fc8 is used on the anchor only
        losses = OrderedDict()
        losses["cls"] = L.softmax_with_loss(fa["fc8"], label_a)
        losses["high"] = L.contrastive_loss(L.l2_normalize(fa["fc7_bn"]),
                                            L.l2_normalize(fb["fc7_bn"]), similar, self.margin)
        total = self.w_cls * losses["cls"] + self.w_high * losses["high"]
        if self.use_low:
            losses["low"] = ncc_loss(fa["pool1"], fb["pool1"], similar, **self.ncc_params)
            total = total + self.w_low * losses["low"]
        losses["total"] = total
        return losses
