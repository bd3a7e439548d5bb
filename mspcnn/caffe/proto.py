"""The subset of Caffe's protobuf schema (package ``caffe``) that mspcnn reads
and writes, built at import time with the protobuf library.

Field names, numbers and types follow BVLC Caffe 1.0's ``caffe.proto``, so
``.caffemodel``, ``.binaryproto`` and LMDB ``Datum`` records are
wire-compatible and prototxt files parse with the same names. Only the
messages and fields MSP-CNN needs are declared; an unknown field in a prototxt
is an error that names it and its line (see :mod:`mspcnn.caffe.io`).

Two additions, not in BVLC Caffe:

* ``TransformationParameter.crop_height`` / ``crop_width`` (11, 12): the
  rectangular crop of the Caffe fork of Xiao et al. (CVPR 2016), used for the
  144 x 56 crops. Text format uses the names, which match that fork; the field
  numbers are ours.
* ``LayerParameter.ncc_loss_param`` (field 2001) with ``NCCLossParameter``:
  the parameters of MSP-CNN's low-level (NCC) loss layer, type ``"NCCLoss"``.
* ``SolverParameter.min_lr`` (1001): the floor of the fork's ``stepdecr``
  learning-rate policy; ``SolverState`` fields 1002-1006 and
  ``RandomStateMT19937``: the random states (plain bytes and integers) and the
  pair sampler's position saved with a snapshot, so that a resumed run
  continues bit for bit, and the SHA-256 of the snapshot's weights file. Field 1001 held a pickle in early versions of mspcnn;
  it is recognised only to refuse such snapshots.
"""
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from mspcnn import defaults as _defaults

_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {
    "double": _F.TYPE_DOUBLE, "float": _F.TYPE_FLOAT, "int64": _F.TYPE_INT64,
    "uint64": _F.TYPE_UINT64, "int32": _F.TYPE_INT32, "uint32": _F.TYPE_UINT32,
    "bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES,
}
_LABELS = {"optional": _F.LABEL_OPTIONAL, "repeated": _F.LABEL_REPEATED}

# Enums: name -> [(value name, number)]; nested in the message given by the key prefix.
_ENUMS = {
    "Phase": [("TRAIN", 0), ("TEST", 1)],
    "FillerParameter.VarianceNorm": [("FAN_IN", 0), ("FAN_OUT", 1), ("AVERAGE", 2)],
    "ParamSpec.DimCheckMode": [("STRICT", 0), ("PERMISSIVE", 1)],
    "SolverParameter.SolverMode": [("CPU", 0), ("GPU", 1)],
    "LossParameter.NormalizationMode": [("FULL", 0), ("VALID", 1), ("BATCH_SIZE", 2), ("NONE", 3)],
    "ConvolutionParameter.Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "DataParameter.DB": [("LEVELDB", 0), ("LMDB", 1)],
    "PoolingParameter.PoolMethod": [("MAX", 0), ("AVE", 1), ("STOCHASTIC", 2)],
    "PoolingParameter.Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "ReLUParameter.Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "SoftmaxParameter.Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
}

# Messages: name -> [(label, type, field name, number, default or None)].
# A type that is not a scalar names a message or enum of this package.
_MESSAGES = {
    "BlobShape": [("repeated", "int64", "dim", 1, None)],
    "BlobProto": [
        ("optional", "BlobShape", "shape", 7, None),
        ("repeated", "float", "data", 5, None),
        ("repeated", "float", "diff", 6, None),
        ("repeated", "double", "double_data", 8, None),
        ("repeated", "double", "double_diff", 9, None),
        ("optional", "int32", "num", 1, "0"),
        ("optional", "int32", "channels", 2, "0"),
        ("optional", "int32", "height", 3, "0"),
        ("optional", "int32", "width", 4, "0"),
    ],
    "BlobProtoVector": [("repeated", "BlobProto", "blobs", 1, None)],
    "Datum": [
        ("optional", "int32", "channels", 1, None),
        ("optional", "int32", "height", 2, None),
        ("optional", "int32", "width", 3, None),
        ("optional", "bytes", "data", 4, None),
        ("optional", "int32", "label", 5, None),
        ("repeated", "float", "float_data", 6, None),
        ("optional", "bool", "encoded", 7, "false"),
    ],
    "FillerParameter": [
        ("optional", "string", "type", 1, "constant"),
        ("optional", "float", "value", 2, "0"),
        ("optional", "float", "min", 3, "0"),
        ("optional", "float", "max", 4, "1"),
        ("optional", "float", "mean", 5, "0"),
        ("optional", "float", "std", 6, "1"),
        ("optional", "int32", "sparse", 7, "-1"),
        ("optional", "FillerParameter.VarianceNorm", "variance_norm", 8, "FAN_IN"),
    ],
    "NetParameter": [
        ("optional", "string", "name", 1, None),
        ("repeated", "string", "input", 3, None),
        ("repeated", "BlobShape", "input_shape", 8, None),
        ("repeated", "int32", "input_dim", 4, None),
        ("optional", "bool", "force_backward", 5, "false"),
        ("optional", "NetState", "state", 6, None),
        ("optional", "bool", "debug_info", 7, "false"),
        ("repeated", "LayerParameter", "layer", 100, None),
    ],
    "NetState": [
        ("optional", "Phase", "phase", 1, "TEST"),
        ("optional", "int32", "level", 2, "0"),
        ("repeated", "string", "stage", 3, None),
    ],
    "NetStateRule": [
        ("optional", "Phase", "phase", 1, None),
        ("optional", "int32", "min_level", 2, None),
        ("optional", "int32", "max_level", 3, None),
        ("repeated", "string", "stage", 4, None),
        ("repeated", "string", "not_stage", 5, None),
    ],
    "ParamSpec": [
        ("optional", "string", "name", 1, None),
        ("optional", "ParamSpec.DimCheckMode", "share_mode", 2, None),
        ("optional", "float", "lr_mult", 3, "1"),
        ("optional", "float", "decay_mult", 4, "1"),
    ],
    "LayerParameter": [
        ("optional", "string", "name", 1, None),
        ("optional", "string", "type", 2, None),
        ("repeated", "string", "bottom", 3, None),
        ("repeated", "string", "top", 4, None),
        ("optional", "Phase", "phase", 10, None),
        ("repeated", "float", "loss_weight", 5, None),
        ("repeated", "ParamSpec", "param", 6, None),
        ("repeated", "BlobProto", "blobs", 7, None),
        ("repeated", "bool", "propagate_down", 11, None),
        ("repeated", "NetStateRule", "include", 8, None),
        ("repeated", "NetStateRule", "exclude", 9, None),
        ("optional", "TransformationParameter", "transform_param", 100, None),
        ("optional", "LossParameter", "loss_param", 101, None),
        ("optional", "BatchNormParameter", "batch_norm_param", 139, None),
        ("optional", "ConcatParameter", "concat_param", 104, None),
        ("optional", "ContrastiveLossParameter", "contrastive_loss_param", 105, None),
        ("optional", "ConvolutionParameter", "convolution_param", 106, None),
        ("optional", "DataParameter", "data_param", 107, None),
        ("optional", "DropoutParameter", "dropout_param", 108, None),
        ("optional", "FlattenParameter", "flatten_param", 135, None),
        ("optional", "InnerProductParameter", "inner_product_param", 117, None),
        ("optional", "InputParameter", "input_param", 143, None),
        ("optional", "MemoryDataParameter", "memory_data_param", 119, None),
        ("optional", "PoolingParameter", "pooling_param", 121, None),
        ("optional", "ReLUParameter", "relu_param", 123, None),
        ("optional", "ScaleParameter", "scale_param", 142, None),
        ("optional", "SoftmaxParameter", "softmax_param", 125, None),
        ("optional", "NCCLossParameter", "ncc_loss_param", 2001, None),
    ],
    "TransformationParameter": [
        ("optional", "float", "scale", 1, "1"),
        ("optional", "bool", "mirror", 2, "false"),
        ("optional", "uint32", "crop_size", 3, "0"),
        ("optional", "uint32", "crop_height", 11, "0"),
        ("optional", "uint32", "crop_width", 12, "0"),
        ("optional", "string", "mean_file", 4, None),
        ("repeated", "float", "mean_value", 5, None),
        ("optional", "bool", "force_color", 6, "false"),
        ("optional", "bool", "force_gray", 7, "false"),
    ],
    "LossParameter": [
        ("optional", "int32", "ignore_label", 1, None),
        ("optional", "LossParameter.NormalizationMode", "normalization", 3, "VALID"),
        ("optional", "bool", "normalize", 2, None),
    ],
    "BatchNormParameter": [
        ("optional", "bool", "use_global_stats", 1, None),
        ("optional", "float", "moving_average_fraction", 2, "0.999"),
        ("optional", "float", "eps", 3, "1e-5"),
    ],
    "ConcatParameter": [
        ("optional", "int32", "axis", 2, "1"),
        ("optional", "uint32", "concat_dim", 1, "1"),
    ],
    "ContrastiveLossParameter": [
        ("optional", "float", "margin", 1, "1"),
        ("optional", "bool", "legacy_version", 2, "false"),
    ],
    "ConvolutionParameter": [
        ("optional", "uint32", "num_output", 1, None),
        ("optional", "bool", "bias_term", 2, "true"),
        ("repeated", "uint32", "pad", 3, None),
        ("repeated", "uint32", "kernel_size", 4, None),
        ("repeated", "uint32", "stride", 6, None),
        ("repeated", "uint32", "dilation", 18, None),
        ("optional", "uint32", "pad_h", 9, "0"),
        ("optional", "uint32", "pad_w", 10, "0"),
        ("optional", "uint32", "kernel_h", 11, None),
        ("optional", "uint32", "kernel_w", 12, None),
        ("optional", "uint32", "stride_h", 13, None),
        ("optional", "uint32", "stride_w", 14, None),
        ("optional", "uint32", "group", 5, "1"),
        ("optional", "FillerParameter", "weight_filler", 7, None),
        ("optional", "FillerParameter", "bias_filler", 8, None),
        ("optional", "ConvolutionParameter.Engine", "engine", 15, "DEFAULT"),
        ("optional", "int32", "axis", 16, "1"),
        ("optional", "bool", "force_nd_im2col", 17, "false"),
    ],
    "DataParameter": [
        ("optional", "string", "source", 1, None),
        ("optional", "uint32", "batch_size", 4, None),
        ("optional", "uint32", "rand_skip", 7, "0"),
        ("optional", "DataParameter.DB", "backend", 8, "LEVELDB"),
        ("optional", "float", "scale", 2, "1"),
        ("optional", "string", "mean_file", 3, None),
        ("optional", "uint32", "crop_size", 5, "0"),
        ("optional", "bool", "mirror", 6, "false"),
        ("optional", "bool", "force_encoded_color", 9, "false"),
        ("optional", "uint32", "prefetch", 10, "4"),
    ],
    "DropoutParameter": [("optional", "float", "dropout_ratio", 1, "0.5")],
    "FlattenParameter": [
        ("optional", "int32", "axis", 1, "1"),
        ("optional", "int32", "end_axis", 2, "-1"),
    ],
    "InnerProductParameter": [
        ("optional", "uint32", "num_output", 1, None),
        ("optional", "bool", "bias_term", 2, "true"),
        ("optional", "FillerParameter", "weight_filler", 3, None),
        ("optional", "FillerParameter", "bias_filler", 4, None),
        ("optional", "int32", "axis", 5, "1"),
        ("optional", "bool", "transpose", 6, "false"),
    ],
    "InputParameter": [("repeated", "BlobShape", "shape", 1, None)],
    "MemoryDataParameter": [
        ("optional", "uint32", "batch_size", 1, None),
        ("optional", "uint32", "channels", 2, None),
        ("optional", "uint32", "height", 3, None),
        ("optional", "uint32", "width", 4, None),
    ],
    "PoolingParameter": [
        ("optional", "PoolingParameter.PoolMethod", "pool", 1, "MAX"),
        ("optional", "uint32", "pad", 4, "0"),
        ("optional", "uint32", "pad_h", 9, "0"),
        ("optional", "uint32", "pad_w", 10, "0"),
        ("optional", "uint32", "kernel_size", 2, None),
        ("optional", "uint32", "kernel_h", 5, None),
        ("optional", "uint32", "kernel_w", 6, None),
        ("optional", "uint32", "stride", 3, "1"),
        ("optional", "uint32", "stride_h", 7, None),
        ("optional", "uint32", "stride_w", 8, None),
        ("optional", "PoolingParameter.Engine", "engine", 11, "DEFAULT"),
        ("optional", "bool", "global_pooling", 12, "false"),
    ],
    "ReLUParameter": [
        ("optional", "float", "negative_slope", 1, "0"),
        ("optional", "ReLUParameter.Engine", "engine", 2, "DEFAULT"),
    ],
    "ScaleParameter": [
        ("optional", "int32", "axis", 1, "1"),
        ("optional", "int32", "num_axes", 2, "1"),
        ("optional", "FillerParameter", "filler", 3, None),
        ("optional", "bool", "bias_term", 4, "false"),
        ("optional", "FillerParameter", "bias_filler", 5, None),
    ],
    "SoftmaxParameter": [
        ("optional", "SoftmaxParameter.Engine", "engine", 1, "DEFAULT"),
        ("optional", "int32", "axis", 2, "1"),
    ],
    "SolverParameter": [
        ("optional", "string", "net", 24, None),
        ("optional", "NetParameter", "net_param", 25, None),
        ("optional", "string", "train_net", 1, None),
        ("repeated", "string", "test_net", 2, None),
        ("optional", "NetParameter", "train_net_param", 21, None),
        ("repeated", "NetParameter", "test_net_param", 22, None),
        ("optional", "NetState", "train_state", 26, None),
        ("repeated", "NetState", "test_state", 27, None),
        ("repeated", "int32", "test_iter", 3, None),
        ("optional", "int32", "test_interval", 4, "0"),
        ("optional", "bool", "test_compute_loss", 19, "false"),
        ("optional", "bool", "test_initialization", 32, "true"),
        ("optional", "float", "base_lr", 5, None),
        ("optional", "int32", "display", 6, None),
        ("optional", "int32", "average_loss", 33, "1"),
        ("optional", "int32", "max_iter", 7, None),
        ("optional", "int32", "iter_size", 36, "1"),
        ("optional", "string", "lr_policy", 8, None),
        ("optional", "float", "gamma", 9, None),
        ("optional", "float", "power", 10, None),
        ("optional", "float", "momentum", 11, None),
        ("optional", "float", "weight_decay", 12, None),
        ("optional", "string", "regularization_type", 29, "L2"),
        ("optional", "int32", "stepsize", 13, None),
        ("repeated", "int32", "stepvalue", 34, None),
        ("optional", "float", "clip_gradients", 35, "-1"),
        ("optional", "int32", "snapshot", 14, "0"),
        ("optional", "string", "snapshot_prefix", 15, None),
        ("optional", "bool", "snapshot_diff", 16, "false"),
        ("optional", "SolverParameter.SolverMode", "solver_mode", 17, "GPU"),
        ("optional", "int32", "device_id", 18, "0"),
        ("optional", "int64", "random_seed", 20, "-1"),
        ("optional", "string", "type", 40, "SGD"),
        ("optional", "bool", "snapshot_after_train", 28, "true"),
        # The floor of the `stepdecr` policy of the Caffe fork of Xiao et al.
        # (CVPR 2016); the field number is ours.
        ("optional", "float", "min_lr", 1001, "0"),
    ],
    "SolverState": [
        ("optional", "int32", "iter", 1, None),
        ("optional", "string", "learned_net", 2, None),
        ("repeated", "BlobProto", "history", 3, None),
        ("optional", "int32", "current_step", 4, "0"),
        # Ours, for a bit-exact resume: the random states as plain data (never code), and where
        # the pair sampler stood. 1001 held a pickle in mspcnn before 2026-11; such snapshots are
        # refused (mspcnn.solver), the field is declared only to recognise them.
        ("optional", "bytes", "rng_state", 1001, None),
        ("optional", "bytes", "torch_rng_state", 1002, None),
        ("optional", "RandomStateMT19937", "numpy_rng_state", 1003, None),
        ("optional", "int64", "data_epoch", 1004, None),
        ("optional", "int64", "data_batch", 1005, None),
        ("optional", "string", "learned_net_sha256", 1006, None),
    ],
    # numpy's legacy MT19937 state (np.random.get_state()): 624 uint32 keys, position, cached
    # Gaussian.
    "RandomStateMT19937": [
        ("repeated", "uint32", "key", 1, None),
        ("optional", "int32", "pos", 2, None),
        ("optional", "int32", "has_gauss", 3, None),
        ("optional", "double", "cached_gaussian", 4, None),
    ],
    # MSP-CNN's low-level similarity loss (docs/method.md, section 3). The defaults
    # of the thresholds disable them (every patch counts); the sweep that
    # chooses MSP-CNN's values is recorded in docs/RESULTS.md when run.
    "NCCLossParameter": [
        ("optional", "uint32", "patch", 1, repr(_defaults.NCC_PATCH)),
        ("optional", "uint32", "search_rows", 2, repr(_defaults.NCC_SEARCH_ROWS)),
        ("optional", "float", "eps", 3, repr(_defaults.NCC_EPS)),
        ("optional", "float", "pos_floor", 4, repr(_defaults.NCC_POS_FLOOR)),
        ("optional", "float", "neg_ceiling", 5, repr(_defaults.NCC_NEG_CEILING)),
        # Weigh positive and negative pairs equally (mspcnn.losses.ncc_loss); off: the mean over
        # every pair, the reconstruction of docs/method.md.
        ("optional", "bool", "balance_pairs", 6, "false"),
    ],
}

_SCALAR_PACKED = {"int64", "uint64", "int32", "uint32", "float", "double", "bool"}
_PACKED = {("BlobShape", "dim"), ("BlobProto", "data"), ("BlobProto", "diff"), ("RandomStateMT19937", "key"),
           ("BlobProto", "double_data"), ("BlobProto", "double_diff")}


def _build():
    fdp = descriptor_pb2.FileDescriptorProto(name="mspcnn_caffe.proto", package="caffe",
                                             syntax="proto2")
    for enum_name, values in _ENUMS.items():
        if "." not in enum_name:
            e = fdp.enum_type.add(name=enum_name)
            for value_name, number in values:
                e.value.add(name=value_name, number=number)
    for msg_name, fields in _MESSAGES.items():
        m = fdp.message_type.add(name=msg_name)
        for enum_name, values in _ENUMS.items():
            if enum_name.startswith(msg_name + "."):
                e = m.enum_type.add(name=enum_name.split(".", 1)[1])
                for value_name, number in values:
                    e.value.add(name=value_name, number=number)
        for label, type_, name, number, default in fields:
            f = m.field.add(name=name, number=number, label=_LABELS[label])
            if type_ in _TYPES:
                f.type = _TYPES[type_]
            elif type_ in _ENUMS:
                f.type = _F.TYPE_ENUM
                f.type_name = ".caffe." + type_
            else:
                f.type = _F.TYPE_MESSAGE
                f.type_name = ".caffe." + type_
            if default is not None:
                f.default_value = default
            if (msg_name, name) in _PACKED and type_ in _SCALAR_PACKED:
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe." + name))
            for name in _MESSAGES}


_CLASSES = _build()
globals().update(_CLASSES)

__all__ = sorted(_CLASSES)
