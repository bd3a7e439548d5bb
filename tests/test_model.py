"""The MSP-CNN model against its Caffe definitions in prototxt_equiv/, run by
the independent prototxt interpreter (mspcnn.caffe.net.CaffeNet)."""
import pytest
import torch

from mspcnn.caffe import io as cio
from mspcnn.caffe.layers import BatchNorm, Pooling, pool_output_size, set_pool_kernels
from mspcnn.caffe.net import CaffeNet
from mspcnn.caffe.weights import layer_blobs_to_net
from mspcnn.model import MSPCNN, MSPCNNBackbone
from mspcnn.paths import DEPLOY_PROTOTXT, PROTOTXT_DIR, TRAIN_VAL_PROTOTXT


def randomise_bn(model, seed=0):
    """Non-trivial BatchNorm accumulators, so global statistics matter."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, BatchNorm):
            mod.factor.fill_(2.5)
            mod.mean_acc.copy_(torch.randn(mod.channels, generator=g))
            mod.var_acc.copy_(torch.rand(mod.channels, generator=g) * 2 + 0.5)


@pytest.fixture(scope="module")
def deploy_pair(tmp_path_factory):
    model = MSPCNNBackbone(num_classes=None, generator=torch.Generator().manual_seed(1))
    randomise_bn(model)
    path = tmp_path_factory.mktemp("w") / "deploy.caffemodel"
    model.save_caffemodel(path)
    net = CaffeNet(DEPLOY_PROTOTXT, "TEST").load_caffemodel(path)
    return model.eval(), net


def test_deploy_layer_list_names_order_and_types(deploy_pair):
    model, net = deploy_pair
    proto_layers = [(lp.name, lp.type) for lp in net.layer_params if lp.type != "Input"]
    assert proto_layers == model.caffe_layers


def test_deploy_parameter_shapes(deploy_pair):
    model, net = deploy_pair
    ours, theirs = model.layer_blobs(), net.layer_blobs()
    assert list(ours) == list(theirs)
    for name in ours:
        assert [tuple(t.shape) for t in ours[name]] == [tuple(t.shape) for t in theirs[name]], name


def test_deploy_output_shapes_and_pooling_rounding(deploy_pair):
    model, net = deploy_pair
    shapes = {}
    hooks = [mod.register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, (i[0].shape, o.shape)))
             for name, mod in model.named_children()]
    with torch.no_grad():
        model(torch.randn(2, 3, 144, 56))
    for h in hooks:
        h.remove()
    tops = {lp.name: lp.top[0] for lp in net.layer_params}
    for name, (in_shape, out_shape) in shapes.items():
        assert tuple(out_shape[1:]) == tuple(net.blob_shapes[tops[name]][1:]), name
        mod = model.m(name)
        if isinstance(mod, Pooling) and not mod.global_pooling:  # Caffe's formula, every pool
            want = tuple(pool_output_size(s, k, st, p) for s, k, st, p in
                         zip(in_shape[-2:], mod.kernel, mod.stride, mod.pad))
            assert tuple(out_shape[-2:]) == want, name
    # docs/method.md's table.
    expected = {"pool1": (32, 72, 28), "inception_1a/output": (256, 72, 28),
                "inception_1b/output": (384, 36, 14), "inception_2a/output": (512, 36, 14),
                "inception_2b/output": (768, 18, 7), "inception_3a/output": (1024, 18, 7),
                "inception_3b/output": (1536, 9, 4), "fc7_bn": (256,)}
    for blob, shape in expected.items():
        assert net.blob_shapes[blob][1:] == shape, blob


def test_deploy_outputs_equal_the_prototxt_net(deploy_pair):
    model, net = deploy_pair
    x = torch.randn(3, 3, 144, 56)
    with torch.no_grad():
        ours = model(x)
        theirs = net({"data": x})
    for key in ("pool1", "fc7_bn"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)


def test_a_smaller_input_computes_what_the_prototxt_net_computes(deploy_pair, tmp_path):
    """The input size is a parameter (the deploy net's Input shape, as Caffe reads it): at 64 x 24
    the backbone's maps are map_sizes' and its outputs those of the prototxt interpreter given the
    same weights and shape; a wrong image size is an error naming the expected one."""
    from mspcnn.model import map_sizes

    model, _ = deploy_pair
    small = MSPCNNBackbone(input_size=(64, 24))
    path = tmp_path / "w.caffemodel"
    model.save_caffemodel(path)
    small.load_caffemodel(path).eval()
    deploy = cio.read_net(DEPLOY_PROTOTXT)
    data = next(lp for lp in deploy.layer if lp.type == "Input")
    data.input_param.shape[0].dim[:] = [3, 3, 64, 24]
    net = CaffeNet(deploy, "TEST").load_caffemodel(path)
    want = {"pool1": "pool1", "inception_1b": "inception_1b/output", "inception_2b": "inception_2b/output",
            "inception_3b": "inception_3b/output"}
    assert {k: net.blob_shapes[b][-2:] for k, b in want.items()} == map_sizes((64, 24)) == \
        {"pool1": (32, 12), "inception_1b": (16, 6), "inception_2b": (8, 3), "inception_3b": (4, 2)}
    x = torch.randn(3, 3, 64, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = small(x), net({"data": x})
    for key in ("pool1", "fc7_bn"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected N x 3 x 64 x 24 images, got \[3, 3, 144, 56\]"):
        small(torch.zeros(3, 3, 144, 56))


@pytest.mark.parametrize("size,ok", [((144, 56), True), ((64, 24), True), ((15, 7), True), ((143, 55), True),
                                     ((72, 28), False), ((144, 57), False), ((16, 16), False), ((0, 8), False)])
def test_which_input_sizes_the_topology_takes(size, ok):
    """check_input_size accepts exactly the sizes for which the network runs (the inception_*b
    blocks' branches agree), and names the nearest size that works otherwise."""
    from mspcnn.model import check_input_size

    runs = True
    try:
        with torch.no_grad():
            probe = MSPCNNBackbone(input_size=(144, 56)).train()
            probe.input_size = size  # bypass the check, to see whether the layers themselves run
            probe(torch.randn(2, 3, *size))
    except (RuntimeError, ValueError):
        runs = False
    assert runs == ok
    if ok:
        assert check_input_size(size) == size
    else:
        with pytest.raises(ValueError, match=r"height of 16k or 16k-1 and a width of 16k\+8 or 16k\+7.*the nearest is \d+ x \d+"):
            check_input_size(size)
    with pytest.raises(ValueError, match="expected \\(height, width\\) integers"):
        check_input_size((64.5, 24))


def test_parameter_multipliers_and_count():
    model = MSPCNNBackbone(num_classes=751)
    assert model.m("conv1").weight.lr_mult == 1 and model.m("conv1").weight.decay_mult == 1
    assert model.m("conv1").bias.lr_mult == 2 and model.m("conv1").bias.decay_mult == 0
    assert model.m("fc8").weight.decay_mult == 1 and model.m("conv1_scale").weight.decay_mult == 0
    assert all(not p.requires_grad or hasattr(p, "lr_mult") for p in model.parameters())
    backbone = MSPCNNBackbone(num_classes=None)
    count = sum(p.numel() for p in backbone.parameters())
    assert count == 6_753_920  # stated in README.md


def test_fillers_follow_caffe():
    model = MSPCNNBackbone(num_classes=10, generator=torch.Generator().manual_seed(0))
    w = model.m("inception_1a/3x3").weight
    bound = (3.0 / (w.numel() / w.shape[0])) ** 0.5  # xavier: fan_in = count / num_output
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(model.m("conv2").bias == 0.2)
    assert abs(model.m("fc8").weight.std().item() - 0.001) < 2e-4


def test_siamese_model_equals_the_train_val_prototxt(tmp_path):
    """Same weights, inputs and dropout mask: the hand-written Siamese model and the prototxt net
    run by the independent interpreter give the same three losses, the same gradients and the same
    BatchNorm statistics, per branch."""
    torch.manual_seed(0)
    model = MSPCNN(num_classes=1367, use_low=True, generator=torch.Generator().manual_seed(3))
    # The interpreter runs BatchNorm, Scale and ReLU as separate layers, and so does the model here:
    # same arithmetic, so a tight tolerance. Our CPU kernels against them: tests/test_layer_kernels.py.
    model.backbone.cpu_kernels = False
    randomise_bn(model, 1)
    path = tmp_path / "train.caffemodel"
    cio.write_caffemodel(layer_blobs_to_net(model.layer_blobs(), model.describe()), path)
    net = CaffeNet(TRAIN_VAL_PROTOTXT, "TRAIN", stages=("stage2",))
    net.load_caffemodel(path, strict=False)  # the "_p" layers' learned blobs are shared by name
    set_pool_kernels(net, False)  # PyTorch's pooling on both sides too
    assert net.layer_blobs()["conv1_p"][0] is net.layer_blobs()["conv1"][0]
    assert net.layer_blobs()["conv1_bn_p"][2] is not net.layer_blobs()["conv1_bn"][2]

    n = 3
    a, b = torch.randn(n, 3, 144, 56), torch.randn(n, 3, 144, 56)
    label, sim = torch.tensor([5.0, 9.0, 700.0]), torch.tensor([1.0, 0.0, 0.0])
    mask = (torch.rand(n, 256) > 0.5).float()
    losses = model(a, b, label, sim, dropout_mask=mask)
    blobs = net({"data": a, "data_p": b, "label": label, "sim": sim}, dropout_masks={"drop7": mask})
    for ours, theirs in (("cls", "loss_cls"), ("high", "loss_high"), ("low", "loss_low")):
        torch.testing.assert_close(losses[ours], blobs[theirs], rtol=1e-4, atol=1e-6)
    losses["total"].backward()
    net.loss(blobs).backward()
    for name in ("conv1", "inception_2a/3x3", "fc7", "fc8"):
        g_model = model.backbone.m(name).weight.grad
        g_net = net.layer_blobs()[name][0].grad
        assert (g_model - g_net).norm() <= 1e-3 * g_net.norm(), name
    # Each branch updated its own accumulators once: factor 2.5 * 0.999 + 1, in both nets.
    ours = model.layer_blobs()
    for layer in ("conv1_bn", "conv1_bn_p", "fc7_bn", "fc7_bn_p"):
        f_model, f_net = ours[layer][2].item(), net.layer_blobs()[layer][2].item()
        assert abs(f_model - f_net) < 1e-5 and abs(f_model - (2.5 * 0.999 + 1)) < 1e-5, layer
        torch.testing.assert_close(ours[layer][0], net.layer_blobs()[layer][0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours["conv1_bn"][0], ours["conv1_bn_p"][0])  # the branches saw other images


def _same(a, b, path=""):
    """Two messages mean the same: every field equal, a field not given counting as its default."""
    for fd in a.DESCRIPTOR.fields:
        x, y = getattr(a, fd.name), getattr(b, fd.name)
        where = f"{path}.{fd.name}"
        if fd.is_repeated:
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                if fd.message_type:
                    _same(u, v, f"{where}[{i}]")
                else:
                    assert u == v, f"{where}[{i}]: {u} != {v}"
        elif fd.message_type:
            _same(x, y, where)
        else:
            assert x == y, f"{where}: {x} != {y}"


def test_train_val_prototxt_is_the_model_description():
    """prototxt_equiv/mspcnn_train_val.prototxt says field for field (defaults resolved) what
    MSPCNN.describe() says: the same layers, order, connections, fillers, multipliers, sharing and
    loss parameters."""
    shipped = cio.read_prototxt(TRAIN_VAL_PROTOTXT)
    ours = MSPCNN(num_classes=1367).describe()
    assert [lp.name for lp in shipped.layer] == [lp.name for lp in ours.layer]
    for theirs, mine in zip(shipped.layer, ours.layer):
        _same(theirs, mine, theirs.name)
    # Caffe 1.0 upgrades nothing in this file (no BatchNorm declares ParamSpecs).
    assert cio.upgrade_net_batchnorm(cio.read_prototxt(TRAIN_VAL_PROTOTXT)) == []


def test_stage_switch_and_per_branch_statistics():
    model = MSPCNN(num_classes=20, generator=torch.Generator().manual_seed(0))
    a, b = torch.randn(2, 3, 144, 56), torch.randn(2, 3, 144, 56) * 3 + 1
    label, sim = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])
    mask = torch.ones(2, 256)
    stage1 = model(a, b, label, sim, dropout_mask=mask)
    assert "low" not in stage1
    model.use_low = True
    stage2 = model(a, b, label, sim, dropout_mask=mask)
    assert torch.isclose(stage2["total"], stage2["cls"] + stage2["high"] + stage2["low"])
    model.merge_bn_batches = True
    merged = model(a, b, label, sim, dropout_mask=mask)
    assert not torch.isclose(merged["high"], stage2["high"])  # statistics differ per branch
    with pytest.raises(ValueError, match=r"expected N x 3 x 144 x 56 images, got \[2, 3, 160, 64\]"):
        model.backbone(torch.randn(2, 3, 160, 64))


def test_prototxt_equiv_files_are_valid_caffe_text():
    for path in sorted(PROTOTXT_DIR.glob("*.prototxt")):
        kind = "SolverParameter" if "solver" in path.name else "NetParameter"
        from mspcnn.caffe import proto

        msg = cio.read_prototxt(path, getattr(proto, kind))
        assert msg.ListFields(), path.name
    solver2 = cio.read_prototxt(PROTOTXT_DIR / "solver_stage2.prototxt",
                                __import__("mspcnn.caffe.proto", fromlist=["x"]).SolverParameter)
    assert "stage2" in solver2.train_state.stage


def test_dropout_mask_is_drawn_from_the_cpu_generator():
    """The mask comes from the CPU generator whatever the device (the GPU test of the training
    command relies on it): the same draw as torch.rand on the CPU, advancing its state, scaled by
    1 / (1 - ratio), and identity in TEST."""
    from mspcnn.caffe.layers import dropout

    x = torch.arange(1.0, 4001.0).reshape(40, 100)
    torch.manual_seed(3)
    y = dropout(x, 0.5, training=True)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    keep = torch.rand(x.shape) >= 0.5
    assert torch.equal(after, torch.get_rng_state())
    assert torch.equal(y, torch.where(keep, x * 2.0, torch.zeros(())))
    assert 1800 < int(keep.sum()) < 2200
    assert dropout(x.double(), 0.5, training=True).dtype == torch.float64
    assert dropout(x, 0.5, training=False) is x


@pytest.mark.parametrize("pair_branches", [False, True])
def test_masks_drawn_outside_the_net_train_as_masks_drawn_inside(pair_branches):
    """CUDA graphs (mspcnn.cuda_graphs) cannot draw the dropout mask inside the pass: the engine draws
    it before each replay with draw_dropout_mask, of shape (pairs, fc7's outputs), and passes it in.
    From one generator state that gives the very losses and gradients of the pass that draws its own
    mask, on both branch layouts."""
    from mspcnn.caffe.layers import draw_dropout_mask
    from mspcnn.model import MSPCNN

    torch.manual_seed(0)
    model = MSPCNN(10, use_low=True).train()
    model.pair_branches = pair_branches
    a, b = torch.randn(3, 3, 144, 56), torch.randn(3, 3, 144, 56)
    label, sim = torch.tensor([1.0, 4.0, 7.0]), torch.tensor([1.0, 0.0, 0.0])
    runs = []
    for outside in (False, True):
        model.zero_grad(set_to_none=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(11)
        mask = (draw_dropout_mask((3, model.backbone.m("fc7").out_features), model.backbone.dropout_ratio)
                if outside else None)
        losses = model(a, b, label, sim, dropout_mask=mask)
        losses["total"].backward()
        runs.append(({k: float(v.detach()) for k, v in losses.items()},
                     [p.grad.clone() for p in model.parameters() if p.grad is not None],
                     torch.get_rng_state()))
        model.load_state_dict(state)  # the BatchNorm accumulators as before the pass
    (l0, g0, s0), (l1, g1, s1) = runs
    assert l0 == l1 and len(g0) == len(g1) and all(torch.equal(x, y) for x, y in zip(g0, g1))
    assert torch.equal(s0, s1)  # one draw each way
