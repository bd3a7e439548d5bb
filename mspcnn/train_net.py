"""The network that trains: the net the solver names, read as Caffe reads it.

In Caffe the solver names the net (``net:``, a file, or ``net_param``, inline; also the older
``train_net`` / ``train_net_param``) and the net is the model: what a user edits in it is what
trains. :func:`read_train_net` does the same for MSP-CNN:

1. it finds the net (a relative ``net:`` path is taken from the working directory, as Caffe
   does, then from the solver file's folder and the folder above it), reads it as Caffe reads
   files (:func:`mspcnn.caffe.io.read_net`: Caffe 1.0's BatchNorm upgrade included) or takes
   ``net_param`` as it is (Caffe does not upgrade inline nets);
2. it keeps the layers of the TRAIN phase for the solver's ``train_state`` (stages, level),
   with Caffe's include/exclude rules;
3. it checks the layers against MSP-CNN's own definition (:meth:`mspcnn.model.MSPCNN.describe`):
   the same layers, connected the same way, with the same structure (channels, kernels,
   strides, pads, pooling, the Input layer's four blobs). mspcnn trains the MSP-CNN topology and nothing else: a
   layer added, removed (other than an unused loss), rewired or reshaped, an unknown layer type,
   or a field mspcnn does not implement is a :class:`NetDefinitionError` naming the file, the
   line and the layer;
4. everything else in the file is configuration and is used: loss weights, the ContrastiveLoss
   margin and legacy_version, the NCCLoss parameters, SoftmaxWithLoss normalisation and
   ignore_label, the dropout ratio, each BatchNorm's eps, moving_average_fraction and
   use_global_stats, fillers, each parameter's lr_mult and decay_mult, and which parameters the
   two branches share (the same sharing as MSP-CNN's; the BatchNorm statistics either per branch
   or all shared). The batch of the Input layer is the default batch, and its image height and
   width the size the net trains at (any size the topology takes,
   :func:`mspcnn.model.check_input_size`; [1]'s is 144 x 56); fc8's num_output is replaced by the
   number of training identities of the data (a note says so when they differ).

The result, :class:`TrainNet`, builds the :class:`mspcnn.model.MSPCNN` that trains.
"""
import os
import re
from collections import OrderedDict

from mspcnn.caffe import io as cio
from mspcnn.caffe import proto
from mspcnn.caffe.net import NetDefinitionError, pair_param
from mspcnn.model import MSPCNN, OPTIONAL_LAYERS, check_input_size

__all__ = ["TrainNet", "read_train_net", "resolve_net_path", "included", "edit_net", "solver_net", "NetDefinitionError"]

# Fields a layer of each type may set (dotted paths; a message field admits all its sub-fields).
# Anything else set in a layer is not implemented by mspcnn and is an error.
_COMMON = {"name", "type", "bottom", "top", "include", "exclude", "param.name", "param.lr_mult",
           "param.decay_mult"}
_FILLER = ("type", "value", "min", "max", "mean", "std", "variance_norm")
_ALLOWED = {
    "Input": {"input_param.shape"},
    "Convolution": {"convolution_param." + f for f in (
        "num_output", "bias_term", "pad", "kernel_size", "stride", "dilation", "pad_h", "pad_w", "kernel_h",
        "kernel_w", "stride_h", "stride_w", "group", "engine", "axis")}
    | {f"convolution_param.{w}.{f}" for w in ("weight_filler", "bias_filler") for f in _FILLER},
    "InnerProduct": {"inner_product_param." + f for f in ("num_output", "bias_term", "axis", "transpose")}
    | {f"inner_product_param.{w}.{f}" for w in ("weight_filler", "bias_filler") for f in _FILLER},
    "BatchNorm": {"batch_norm_param." + f for f in ("use_global_stats", "moving_average_fraction", "eps")},
    "Scale": {"scale_param." + f for f in ("axis", "num_axes", "bias_term")}
    | {f"scale_param.{w}.{f}" for w in ("filler", "bias_filler") for f in _FILLER},
    "ReLU": {"relu_param.negative_slope", "relu_param.engine"},
    "Pooling": {"pooling_param." + f for f in (
        "pool", "pad", "pad_h", "pad_w", "kernel_size", "kernel_h", "kernel_w", "stride", "stride_h",
        "stride_w", "engine", "global_pooling")},
    "Concat": {"concat_param.axis", "concat_param.concat_dim"},
    "Dropout": {"dropout_param.dropout_ratio"},
    "L2Normalize": set(),
    "SoftmaxWithLoss": {"loss_weight", "loss_param.ignore_label", "loss_param.normalization",
                        "loss_param.normalize", "softmax_param.axis", "softmax_param.engine"},
    "ContrastiveLoss": {"loss_weight", "contrastive_loss_param.margin", "contrastive_loss_param.legacy_version"},
    "NCCLoss": {"loss_weight"} | {"ncc_loss_param." + f for f in (
        "patch", "search_rows", "eps", "pos_floor", "neg_ceiling", "balance_pairs")},
}
_BLOBS = {"Convolution": 2, "InnerProduct": 2, "Scale": 2, "BatchNorm": 3}


def _set_fields(msg, prefix=""):
    """Dotted paths of the fields set in ``msg``, down to scalars (repeated messages merged)."""
    out = []
    for fd, value in msg.ListFields():
        path = prefix + fd.name
        if fd.message_type is not None:
            items = value if fd.is_repeated else [value]
            if path in ("include", "exclude", "input_param.shape"):
                out.append(path)
                continue
            sub = sorted({p for item in items for p in _set_fields(item, path + ".")})
            out.extend(sub or [path])
        else:
            out.append(path)
    return out


def _structure(lp):
    """The values of a layer that define MSP-CNN's structure (Caffe's defaults resolved)."""
    t = lp.type
    if t == "Convolution":
        c = lp.convolution_param
        return {"num_output": c.num_output, "kernel": pair_param(c, "kernel_size", "kernel_h", "kernel_w", None),
                "stride": pair_param(c, "stride", "stride_h", "stride_w", 1),
                "pad": pair_param(c, "pad", "pad_h", "pad_w", 0),
                "dilation": pair_param(c, "dilation", "dilation", "dilation", 1) if len(c.dilation) else (1, 1),
                "group": c.group, "bias_term": c.bias_term, "axis": c.axis}
    if t == "InnerProduct":
        ip = lp.inner_product_param
        return {"num_output": ip.num_output if lp.name != "fc8" else "classes", "bias_term": ip.bias_term,
                "axis": ip.axis, "transpose": ip.transpose}
    if t == "Pooling":
        pp = lp.pooling_param
        if pp.global_pooling:
            return {"pool": pp.pool, "global_pooling": True}
        return {"pool": pp.pool, "kernel": pair_param(pp, "kernel_size", "kernel_h", "kernel_w", None),
                "stride": pair_param(pp, "stride", "stride_h", "stride_w", 1),
                "pad": pair_param(pp, "pad", "pad_h", "pad_w", 0), "global_pooling": False}
    if t == "Scale":
        sp = lp.scale_param
        return {"axis": sp.axis, "num_axes": sp.num_axes, "bias_term": sp.bias_term}
    if t == "ReLU":
        return {"negative_slope": lp.relu_param.negative_slope}
    if t == "Concat":
        cp = lp.concat_param
        return {"axis": cp.axis if cp.HasField("axis") or not cp.HasField("concat_dim") else cp.concat_dim}
    if t == "Input":  # the images' height and width are free (checked in read_train_net)
        return {"shapes": [tuple(s.dim)[1:2] if len(s.dim) == 4 else tuple(s.dim)[1:] for s in lp.input_param.shape]}
    if t == "SoftmaxWithLoss":
        return {"axis": lp.softmax_param.axis}
    return {}


def included(lp, state):
    """Caffe's ``StateMeetsRule`` for a layer: with include rules, one must be met; with exclude
    rules, none; a rule is met when its phase (if set) is the state's, the level is within
    min_level / max_level, the state has all of its stages and none of its not_stages."""
    def met(rule):
        return ((not rule.HasField("phase") or rule.phase == state.phase)
                and (not rule.HasField("min_level") or state.level >= rule.min_level)
                and (not rule.HasField("max_level") or state.level <= rule.max_level)
                and all(s in state.stage for s in rule.stage)
                and not any(s in state.stage for s in rule.not_stage))

    if lp.include:
        return any(met(r) for r in lp.include)
    return not any(met(r) for r in lp.exclude)


def _versions(layers):
    """For each layer, the (blob, version) pairs it reads and writes: two nets that agree on these
    compute the same thing, in-place layers included."""
    version, out = {}, {}
    for lp in layers:
        reads = [(b, version.get(b, 0)) for b in lp.bottom]
        for t in lp.top:
            version[t] = version.get(t, 0) + 1
        out[lp.name] = (reads, [(t, version[t]) for t in lp.top])
    return out


def _sharing(layers):
    """The groups of (layer, blob index) that share a parameter by ParamSpec name."""
    groups = {}
    for lp in layers:
        for i, spec in enumerate(lp.param):
            if spec.name:
                groups.setdefault(spec.name, []).append((lp.name, i))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def _line_finder(text):
    lines = {}
    if text is None:
        return lines
    pattern = re.compile(r'\bname\s*:\s*"([^"]*)"')
    for number, line in enumerate(text.splitlines(), 1):
        for m in pattern.finditer(line):
            lines.setdefault(m.group(1), number)
    return lines


class TrainNet:
    """The training net read from a solver (see the module docstring).

    Attributes: ``source`` (where it was read), ``layers`` (name -> LayerParameter, the active
    layers), ``stages``, ``batch_pairs`` (the Input layer's batch), ``input_size`` (its images'
    height and width), ``num_output`` (fc8's in the file), ``share_bn_stats``, ``notes`` (lines
    for the log: upgrades applied, ...)."""

    def __init__(self, source, layers, stages, batch_pairs, num_output, share_bn_stats, notes, input_size=(144, 56)):
        self.source, self.layers, self.stages = source, layers, tuple(stages)
        self.batch_pairs, self.num_output, self.input_size = batch_pairs, num_output, tuple(input_size)
        self.share_bn_stats, self.notes = share_bn_stats, list(notes)

    @property
    def losses(self):
        """{loss layer name: loss weight} of the active loss layers."""
        from mspcnn.model import loss_weight

        return {n: loss_weight(lp) for n, lp in self.layers.items() if n.startswith("loss_")}

    def set_loss_weights(self, weights):
        """Set loss weights ({"loss_cls": w, ...}) as if the file said them. A loss layer the net
        does not have (e.g. loss_low in stage 1) may only be given 0."""
        for name, w in weights.items():
            if name not in self.layers:
                if float(w) == 0:
                    continue
                raise NetDefinitionError(
                    f"{self.source}: a weight of {w:g} for {name!r}, which the TRAIN net"
                    f"{' (stages ' + ', '.join(self.stages) + ')' if self.stages else ''} does not have "
                    f"(its losses: {', '.join(self.losses) or 'none'}); give it 0")
            self.layers[name].loss_weight[:] = [float(w)]

    def build(self, num_classes, generator=None):
        """The :class:`mspcnn.model.MSPCNN` of this net, fc8 with ``num_classes`` outputs."""
        layers = OrderedDict((n, lp) for n, lp in self.layers.items())
        fc8 = proto.LayerParameter()
        fc8.CopyFrom(layers["fc8"])
        fc8.inner_product_param.num_output = num_classes
        layers["fc8"] = fc8
        return MSPCNN(num_classes, generator=generator, layer_params=layers,
                      share_bn_stats=self.share_bn_stats, input_size=self.input_size)


def resolve_net_path(net, solver_path=None):
    """The file of a solver's ``net:``: as given (Caffe: relative to the working directory), else
    relative to the solver file's folder or the folder above it. Raises FileNotFoundError listing
    the places tried."""
    tried = [net]
    if os.path.isfile(net) or os.path.isabs(net):
        if os.path.isfile(net):
            return net
    elif solver_path:
        base = os.path.dirname(os.path.abspath(solver_path))
        for root in (base, os.path.dirname(base)):
            candidate = os.path.join(root, net)
            tried.append(candidate)
            if os.path.isfile(candidate):
                return candidate
    where = f"{solver_path}: " if solver_path else ""
    raise FileNotFoundError(f"{where}net file {net!r} not found (tried {', '.join(tried)})")


def read_train_net(solver, solver_path=None, net=None):
    """The training net of ``solver`` (a SolverParameter read from ``solver_path``), or ``net``
    (a NetParameter, or a path) when given instead. Returns a :class:`TrainNet`; raises
    NetDefinitionError, CaffeFormatError or FileNotFoundError naming the file and line."""
    notes = []
    sources = [f for f in ("net", "net_param", "train_net", "train_net_param") if solver.HasField(f)]
    if net is None:
        if len(sources) != 1:
            raise NetDefinitionError(
                f"{solver_path or 'solver'}: give exactly one of net, net_param, train_net, train_net_param "
                f"(found {', '.join(sources) or 'none'})")
        field = sources[0]
        if field in ("net", "train_net"):
            path = resolve_net_path(getattr(solver, field), solver_path)
            net_param, source = cio.read_prototxt(path), path
            with open(path, encoding="utf-8") as f:
                text = f.read()
            upgraded = cio.upgrade_net_batchnorm(net_param)
        else:
            net_param, source, upgraded = proto.NetParameter(), f"{solver_path or 'solver'} ({field})", []
            net_param.CopyFrom(getattr(solver, field))
            text = open(solver_path, encoding="utf-8").read() if solver_path else None
    elif isinstance(net, proto.NetParameter):
        net_param, source, upgraded, text = net, "net", [], None
    else:
        source = os.fspath(net)
        net_param = cio.read_prototxt(source)
        with open(source, encoding="utf-8") as f:
            text = f.read()
        upgraded = cio.upgrade_net_batchnorm(net_param)
    if upgraded:
        notes.append(f"{source}: {len(upgraded)} BatchNorm layers declared three ParamSpecs; Caffe 1.0 "
                     "removes them (UpgradeNetBatchNorm), so their statistics are not shared")
    lines = _line_finder(text)

    def where(name):
        line = lines.get(name)
        return f"{source}, line {line}: layer {name!r}" if line else f"{source}: layer {name!r}"

    state = proto.NetState(phase=0)
    state.MergeFrom(net_param.state)
    state.phase = 0
    state.stage.extend(s for s in solver.train_state.stage if s not in state.stage)
    if solver.train_state.HasField("level"):
        state.level = solver.train_state.level
    stages = tuple(state.stage)

    names = [lp.name for lp in net_param.layer]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise NetDefinitionError(f"{where(dup[0])}: the name is used by {names.count(dup[0])} layers")
    active = [lp for lp in net_param.layer if included(lp, state)]
    by_name = OrderedDict((lp.name, lp) for lp in active)

    # What MSP-CNN's net is, written by mspcnn.model (num_classes is irrelevant to the check).
    canon_model = MSPCNN(2)
    canon = OrderedDict((lp.name, lp) for lp in canon_model.describe().layer)

    for lp in active:
        if lp.type not in _ALLOWED:
            raise NetDefinitionError(f"{where(lp.name)}: layer type {lp.type!r} is not supported by "
                                     f"mspcnn ({', '.join(sorted(_ALLOWED))})")
        if lp.name not in canon:
            raise NetDefinitionError(f"{where(lp.name)}: not a layer of MSP-CNN's network; mspcnn trains "
                                     "MSP-CNN's topology (edit layer parameters, not layers)")
        ref = canon[lp.name]
        if lp.type != ref.type:
            raise NetDefinitionError(f"{where(lp.name)}: type {lp.type!r}, MSP-CNN's layer is {ref.type!r}")
        extra = [f for f in _set_fields(lp) if f not in _COMMON and f not in _ALLOWED[lp.type]]
        if lp.loss_weight and lp.type not in ("SoftmaxWithLoss", "ContrastiveLoss", "NCCLoss"):
            extra.append("loss_weight")
        if extra:
            raise NetDefinitionError(f"{where(lp.name)}: field {extra[0]} is not supported by mspcnn for "
                                     f"{lp.type} layers")
        ours, theirs = _structure(lp), _structure(ref)
        for key in theirs:
            if ours.get(key) != theirs[key]:
                raise NetDefinitionError(
                    f"{where(lp.name)}: {key} is {ours.get(key)}, MSP-CNN's is {theirs[key]} (mspcnn trains "
                    "MSP-CNN's structure; only parameters such as loss weights, fillers and multipliers "
                    "may change)")
        blobs = _BLOBS.get(lp.type, 0)
        if lp.type == "Convolution" and not lp.convolution_param.bias_term or \
                lp.type == "InnerProduct" and not lp.inner_product_param.bias_term:
            blobs = 1
        if len(lp.param) > blobs:
            raise NetDefinitionError(f"{where(lp.name)}: {len(lp.param)} ParamSpecs for {blobs} blobs")
        if lp.type == "BatchNorm":
            for spec in lp.param:
                if spec.lr_mult != 0 or (spec.HasField("decay_mult") and spec.decay_mult != 0):
                    raise NetDefinitionError(f"{where(lp.name)}: BatchNorm statistics cannot be learned "
                                             "(Caffe requires lr_mult 0 on them)")

    missing = [n for n in canon if n not in by_name and n not in OPTIONAL_LAYERS]
    if missing:
        raise NetDefinitionError(f"{source}: MSP-CNN's layer {missing[0]!r} is missing from the "
                                 f"{'TRAIN' + (' ' + '+'.join(stages) if stages else '')} net"
                                 f"{' (and ' + str(len(missing) - 1) + ' more)' if len(missing) > 1 else ''}")
    if "loss_high" in by_name and not {"fc7_norm", "fc7_norm_p"} <= set(by_name):
        raise NetDefinitionError(f"{where('loss_high')}: needs the layers fc7_norm and fc7_norm_p")
    if not any(n in by_name for n in ("loss_cls", "loss_high", "loss_low")):
        raise NetDefinitionError(f"{source}: the TRAIN net has no loss layer")

    # Connections: the same blobs read and written (versions count in-place layers).
    ours = _versions(active)
    theirs = _versions([lp for n, lp in canon.items() if n in by_name])
    for name in by_name:
        if ours[name] != theirs[name]:
            (r1, w1), (r2, w2) = ours[name], theirs[name]
            raise NetDefinitionError(
                f"{where(name)}: reads {[b for b, _ in r1]} and writes {[b for b, _ in w1]} (in this order "
                f"of the layers), MSP-CNN's reads {[b for b, _ in r2]} and writes {[b for b, _ in w2]}")

    # Parameter sharing: MSP-CNN's for the learned parameters; BatchNorm statistics all per branch
    # or all shared with the first branch.
    share = _sharing(active)
    bn_groups = {g for g in share if by_name[next(iter(g))[0]].type == "BatchNorm"}
    want = _sharing([canon[n] for n in by_name])
    if share - bn_groups != want:
        diff = sorted(tuple(sorted(g)) for g in (share - bn_groups) ^ want)[0]
        raise NetDefinitionError(
            f"{where(diff[0][0])}: parameters shared by ParamSpec name differ from MSP-CNN's (the two "
            f"branches share every learned parameter, layer by layer): group {list(diff)}")
    bn_pairs = {frozenset({(n, i), (n + "_p", i)}) for n, lp in by_name.items()
                if lp.type == "BatchNorm" and not n.endswith("_p") for i in range(3)}
    if bn_groups and bn_groups != bn_pairs:
        bad = sorted(tuple(sorted(g)) for g in bn_groups ^ bn_pairs)[0]
        raise NetDefinitionError(
            f"{where(bad[0][0])}: BatchNorm statistics must be all per branch (no ParamSpecs) or all "
            f"shared by the two branches (three named ParamSpecs each, in a net Caffe does not upgrade); "
            f"this net shares {list(bad)} differently")
    for group in share:
        specs = [by_name[n].param[i] for n, i in sorted(group)]
        for key in ("lr_mult", "decay_mult"):
            values = {getattr(s, key) for s in specs if s.HasField(key)}
            if len(values) > 1:
                raise NetDefinitionError(f"{where(sorted(group)[0][0])}: shared parameter {specs[0].name!r} "
                                         f"has mismatched {key} {sorted(values)} (Caffe refuses this too)")

    shapes = [list(s.dim) for s in by_name["pairs"].input_param.shape]
    batch = {s[0] for s in shapes}
    if len(batch) != 1 or min(batch) < 1:
        raise NetDefinitionError(f"{where('pairs')}: the four inputs need one batch size >= 1, got "
                                 f"{[s[0] for s in shapes]}")
    sizes = {tuple(s[2:]) for s in shapes[:2]}
    if len(sizes) != 1:
        raise NetDefinitionError(f"{where('pairs')}: data and data_p need one height and width, got "
                                 f"{' and '.join(' x '.join(map(str, s)) for s in sorted(sizes))}")
    try:
        input_size = check_input_size(sizes.pop())
    except ValueError as exc:
        raise NetDefinitionError(f"{where('pairs')}: {exc}") from None
    return TrainNet(source, by_name, stages, batch.pop(), by_name["fc8"].inner_product_param.num_output,
                    bool(bn_groups), notes, input_size)


def solver_net(solver_path):
    """The net a solver file names, read as Caffe reads files (a copy to edit)."""
    sp = cio.read_prototxt(solver_path, proto.SolverParameter)
    if not sp.net:
        raise NetDefinitionError(f"{solver_path}: the solver names no net file (net:)")
    return cio.read_net(resolve_net_path(sp.net, str(solver_path)))


def edit_net(net, bn_maf=None, ncc=None, input_size=None):
    """Edit a NetParameter in place, as a user edits the prototxt: ``bn_maf`` sets every BatchNorm's
    moving_average_fraction; ``ncc`` ({"w_low", "pos_floor", "neg_ceiling", "balance_pairs"}, None
    values skipped) sets the NCCLoss layer's loss weight, thresholds and pair weighting;
    ``input_size`` (height, width) sets the images' shape in the Input layer (the size the net trains
    at). Returns ``net``."""
    if input_size is not None:
        input_size = check_input_size(input_size)
        layer = next((lp for lp in net.layer if lp.type == "Input"), None)
        if layer is None or len(layer.input_param.shape) < 2:
            raise NetDefinitionError("the net has no Input layer of image pairs to edit")
        for shape in layer.input_param.shape[:2]:
            if len(shape.dim) != 4:
                raise NetDefinitionError(f"the Input layer's images are not N x C x H x W ({list(shape.dim)})")
            shape.dim[2:] = list(input_size)
    if bn_maf is not None:
        if not 0 <= bn_maf < 1:
            raise ValueError(f"moving_average_fraction must be in [0, 1), got {bn_maf}")
        for lp in net.layer:
            if lp.type == "BatchNorm":
                lp.batch_norm_param.moving_average_fraction = bn_maf
    ncc = {k: v for k, v in (ncc or {}).items() if v is not None}
    if ncc:
        layer = next((lp for lp in net.layer if lp.type == "NCCLoss"), None)
        if layer is None:
            raise NetDefinitionError("the net has no NCCLoss layer to edit")
        if "w_low" in ncc:
            layer.loss_weight[:] = [float(ncc["w_low"])]
        for key in ("pos_floor", "neg_ceiling"):
            if key in ncc:
                setattr(layer.ncc_loss_param, key, float(ncc[key]))
        if "balance_pairs" in ncc:
            value = ncc["balance_pairs"]
            if value not in (0, 1, True, False):
                raise ValueError(f"balance_pairs must be 0 or 1 (false or true), got {value!r}")
            layer.ncc_loss_param.balance_pairs = bool(value)
    return net
