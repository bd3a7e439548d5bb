"""Caffe semantics against real Caffe (tests/data/caffe_golden, see its README):
every blob, blob gradient and parameter gradient of the `layers` nets in both
phases, the BatchNorm accumulators, ContrastiveLoss in both versions, and the
import of a .caffemodel with BatchNorm statistics."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mspcnn.caffe import io as cio
from mspcnn.caffe.layers import contrastive_loss
from mspcnn.caffe.net import CaffeNet

GOLDEN = Path(__file__).parent / "data" / "caffe_golden"
LAYERS = GOLDEN / "layers"
REL_TOL = 1e-5  # per tensor: max|got - ref| <= REL_TOL * max|ref| (golden README)
ZERO_ATOL = 1e-6  # tensors that are exactly zero in exact arithmetic

# Bias gradients that are 0 in exact arithmetic in TRAIN (the bias feeds a
# BatchNorm): Caffe's values are float noise (golden README, "Traps").
EXACT_ZERO = {"conv1/1", "convC/1", "convF/1", "fc1/1"}


def assert_tensor_close(got, ref, key, zero=False):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{key}: shape {got.shape} != {ref.shape}"
    err = np.abs(got - ref).max() if got.size else 0.0
    scale = np.abs(ref).max() if ref.size else 0.0
    if zero or scale == 0:
        assert err <= ZERO_ATOL, f"{key}: max abs error {err:.3g}"
    else:
        assert err <= REL_TOL * scale, f"{key}: relative error {err / scale:.3g}"


def assert_layer_blobs_close(net, expected):
    """Every `<layer>/<i>` entry of `expected` against the net's blob i of that layer."""
    layer_blobs = net.layer_blobs()
    for key in expected.keys():
        layer, i = key.rsplit("/", 1)
        assert_tensor_close(layer_blobs[layer][int(i)].detach().numpy(), expected[key], key)


def run_layers_case(prototxt, phase, weights, masks=None):
    net = CaffeNet(LAYERS / prototxt, phase).load_caffemodel(weights)
    inp = np.load(LAYERS / "input.npz")
    data = torch.from_numpy(inp["data"]).requires_grad_(True)
    blobs = net({"data": data, "label": torch.from_numpy(inp["label"])},
                dropout_masks=masks, retain_grad=True)
    net.loss(blobs).backward()
    return net, data, blobs


def check_case(net, data, blobs, case_dir, train):
    forward = np.load(case_dir / "forward.npz")
    assert set(forward.keys()) <= set(blobs), sorted(set(forward.keys()) - set(blobs))
    for key in forward.keys():
        assert_tensor_close(blobs[key].detach().numpy(), forward[key], f"forward {key}")
    backward = np.load(case_dir / "backward.npz")
    for key in backward.keys():
        if key == "label":
            continue
        t = data if key == "data" else blobs[key]
        g = t.grad.numpy() if t.grad is not None else np.zeros(t.shape, np.float32)
        assert_tensor_close(g, backward[key], f"diff {key}")
    param_diff = np.load(case_dir / "param_diff.npz")
    layer_blobs = net.layer_blobs()
    for key in param_diff.keys():
        layer, i = key.rsplit("/", 1)
        t = layer_blobs[layer][int(i)]
        g = t.grad.numpy() if isinstance(t, torch.nn.Parameter) and t.grad is not None \
            else np.zeros(t.shape, np.float32)  # BatchNorm blobs: Caffe writes no diff
        assert_tensor_close(g, param_diff[key], f"param diff {key}",
                            zero=train and key in EXACT_ZERO)


def test_layers_train():
    net, data, blobs = run_layers_case("train.prototxt", "TRAIN", LAYERS / "init.caffemodel")
    check_case(net, data, blobs, LAYERS / "train", train=True)
    assert_layer_blobs_close(net, np.load(LAYERS / "train" / "params_after_forward.npz"))


def test_layers_train_dropout():
    mask = torch.from_numpy(np.load(LAYERS / "train_dropout" / "dropout_mask.npy"))
    net, data, blobs = run_layers_case("train_dropout.prototxt", "TRAIN", LAYERS / "init.caffemodel",
                                       masks={"drop": mask})
    check_case(net, data, blobs, LAYERS / "train_dropout", train=True)


def test_batchnorm_accumulators_after_warmup():
    """Three TRAIN forwards from init.caffemodel give test/weights.caffemodel."""
    net = CaffeNet(LAYERS / "train.prototxt", "TRAIN").load_caffemodel(LAYERS / "init.caffemodel")
    warm = np.load(LAYERS / "test" / "warmup.npz")
    with torch.no_grad():
        for d, lab in zip(warm["data"], warm["label"]):
            net({"data": torch.from_numpy(d), "label": torch.from_numpy(lab)})
    assert_layer_blobs_close(net, np.load(LAYERS / "test" / "params.npz"))
    assert abs(net.layer_blobs()["bn1"][2].item() - 2.997001) < 1e-6


def test_layers_test_phase():
    net, data, blobs = run_layers_case("test.prototxt", "TEST", LAYERS / "test" / "weights.caffemodel")
    check_case(net, data, blobs, LAYERS / "test", train=False)
    # The TEST forward changes no parameter.
    assert_layer_blobs_close(net, np.load(LAYERS / "test" / "params.npz"))


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss(legacy):
    inp = np.load(GOLDEN / "contrastive" / "inputs.npz")
    ref = np.load(GOLDEN / "contrastive" / f"legacy_{str(legacy).lower()}.npz")
    a = torch.from_numpy(inp["a"]).requires_grad_(True)
    b = torch.from_numpy(inp["b"]).requires_grad_(True)
    loss = contrastive_loss(a, b, torch.from_numpy(inp["y"]), 1.0, legacy)
    loss.backward()
    assert_tensor_close(loss.detach().numpy(), ref["loss"], "loss")
    assert_tensor_close(a.grad.numpy(), ref["grad_a"], "grad_a")
    assert_tensor_close(b.grad.numpy(), ref["grad_b"], "grad_b")
    assert torch.isfinite(a.grad).all()  # pair 2 has d = 0


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_prototxt_runs_as_a_net(legacy):
    inp = np.load(GOLDEN / "contrastive" / "inputs.npz")
    ref = np.load(GOLDEN / "contrastive" / f"legacy_{str(legacy).lower()}.npz")
    net = CaffeNet(GOLDEN / "contrastive" / f"legacy_{str(legacy).lower()}.prototxt", "TRAIN")
    blobs = net({k: torch.from_numpy(inp[k]) for k in ("a", "b", "y")})
    assert_tensor_close(net.loss(blobs).detach().numpy(), ref["loss"], "loss")


def test_caffemodel_import_with_batchnorm_statistics():
    case = GOLDEN / "caffemodel"
    net = CaffeNet(case / "deploy.prototxt", "TEST").load_caffemodel(case / "model.caffemodel")
    assert_layer_blobs_close(net, np.load(case / "blobs.npz"))
    forward = np.load(case / "forward.npz")
    with torch.no_grad():
        blobs = net({"data": torch.from_numpy(forward["data"])})
    for key in forward.keys():
        assert torch.isfinite(blobs[key]).all(), key  # bn_fc has factor 0: no inf/NaN
        assert_tensor_close(blobs[key].numpy(), forward[key], key)


def test_weights_round_trip_is_exact(tmp_path):
    case = GOLDEN / "caffemodel"
    net = CaffeNet(case / "deploy.prototxt", "TEST").load_caffemodel(case / "model.caffemodel")
    path = tmp_path / "copy.caffemodel"
    net.save_caffemodel(path)
    again = CaffeNet(case / "deploy.prototxt", "TEST", generator=torch.Generator().manual_seed(5))
    again.load_caffemodel(path)
    for (name, ts), (_, us) in zip(net.layer_blobs().items(), again.layer_blobs().items()):
        for t, u in zip(ts, us):
            assert torch.equal(t, u), name
    assert cio.read_caffemodel(path).layer[1].convolution_param.num_output == 4


def test_mismatched_caffemodel_names_layer_and_shapes_and_loads_nothing(tmp_path):
    case = GOLDEN / "caffemodel"
    model = cio.read_caffemodel(case / "model.caffemodel")
    fc = [lp for lp in model.layer if lp.name == "fc"][0]
    fc.blobs[0].CopyFrom(cio.array_to_blob(np.zeros((3, 7), np.float32)))
    bad = tmp_path / "bad.caffemodel"
    cio.write_caffemodel(model, bad)
    net = CaffeNet(case / "deploy.prototxt", "TEST", generator=torch.Generator().manual_seed(0))
    before = {k: [t.clone() for t in ts] for k, ts in net.layer_blobs().items()}
    with pytest.raises(cio.CaffeFormatError,
                       match=r"layer 'fc' blob 0 has shape \[3, 7\], the model expects \[3, 120\]"):
        net.load_caffemodel(bad)
    for name, ts in net.layer_blobs().items():  # nothing half-loaded (conv comes first)
        for t, u in zip(ts, before[name]):
            assert torch.equal(t, u), name


def test_unknown_layer_type_and_field_name_their_line(tmp_path):
    text = (LAYERS / "train.prototxt").read_text()
    bad_type = tmp_path / "bad_type.prototxt"
    bad_type.write_text(text.replace('type: "ReLU"', 'type: "Relu"', 1))
    with pytest.raises(ValueError, match=r"line \d+: layer \d+ 'relu1' \(type 'Relu'\): unknown "
                                         r"layer type 'Relu'"):
        CaffeNet(bad_type, "TRAIN")
    bad_field = tmp_path / "bad_field.prototxt"
    lines = text.splitlines()
    lines.insert(5, "  colour: 3")
    bad_field.write_text("\n".join(lines))
    with pytest.raises(cio.CaffeFormatError, match=r"bad_field.prototxt, line 6: .*no field named "
                                                   r"\"colour\""):
        CaffeNet(bad_field, "TRAIN")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.caffemodel not found: .*nope.caffemodel"):
        cio.read_caffemodel(tmp_path / "nope.caffemodel")
    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(b"\xff\xff\xff\xff not a protobuf")
    with pytest.raises(cio.CaffeFormatError, match="junk.caffemodel: not a valid .caffemodel"):
        cio.read_caffemodel(junk)


def test_binaryproto_mean_from_compute_image_mean(tmp_path):
    mean = cio.read_binaryproto(GOLDEN / "lmdb" / "mean.binaryproto")
    ref = np.load(GOLDEN / "lmdb" / "mean.npy")
    assert mean.shape == (3, 160, 64) and mean.dtype == np.float32
    assert np.array_equal(mean, ref)
    path = tmp_path / "copy.binaryproto"
    cio.write_binaryproto(mean, path)
    assert np.array_equal(cio.read_binaryproto(path), mean)
    raw = cio.proto.BlobProto()
    raw.ParseFromString(path.read_bytes())
    assert (raw.num, raw.channels, raw.height, raw.width) == (1, 3, 160, 64)  # legacy dims
    assert not raw.HasField("shape")
