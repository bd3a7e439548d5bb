"""Caffe's SGD solver against real Caffe (tests/data/caffe_golden/solver), its
learning-rate policies, snapshots and bit-exact resume."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mspcnn.caffe import io as cio
from mspcnn.caffe import proto
from mspcnn.caffe.net import CaffeNet
from mspcnn.solver import SGDSolver, learning_rate

GOLDEN = Path(__file__).parent / "data" / "caffe_golden" / "solver"


def golden_setup(case):
    sp = cio.read_prototxt(GOLDEN / f"solver_{case}.prototxt", proto.SolverParameter)
    net = CaffeNet(sp.net_param, "TRAIN").load_caffemodel(GOLDEN / "init.caffemodel")
    return sp, net, SGDSolver(sp, net.param_groups(), net.layer_blobs)


def feeder(net, t, data=np.load(GOLDEN / "data.npz")):
    def forward_backward(k):
        b = 2 * t + k  # iteration t: mini-batches 2t and 2t+1
        blobs = net({"data": torch.from_numpy(data["data"][4 * b:4 * b + 4]),
                     "label": torch.from_numpy(data["label"][4 * b:4 * b + 4])})
        loss = net.loss(blobs)
        loss.backward()
        return loss.item()
    return forward_backward


@pytest.mark.parametrize("case", ["step", "poly"])
def test_twelve_iterations_match_caffe(case):
    sp, net, solver = golden_setup(case)
    ref = np.load(GOLDEN / case / "trajectory.npz")
    for t in range(12):
        assert solver.rate() == ref["lr"][t]  # bit for bit
        loss = solver.step(feeder(net, t))
        assert loss == pytest.approx(float(ref["loss"][t]), rel=1e-5)
        blobs = net.layer_blobs()
        for key in ref.keys():
            kind, layer, i = key.split("/") if key.count("/") == 2 else (None, None, None)
            if kind not in ("params", "grad_accum"):
                continue
            t_ = blobs[layer][int(i)]
            if kind == "params":
                got, want = t_.detach().numpy(), ref[key][t + 1]
            elif isinstance(t_, torch.nn.Parameter):
                got, want = t_.grad.numpy(), ref[key][t]
            else:
                continue  # BatchNorm accumulators have no diff
            scale = np.abs(want).max()
            err = np.abs(got - want).max()
            if kind == "grad_accum" and layer == "conv" and i == "1":
                assert err <= 1e-6, key  # exactly 0 in exact arithmetic (feeds BatchNorm)
            else:
                assert err <= 1e-5 * scale, f"{key} at iteration {t}: {err / scale:.2g}"


def solver_param(**kw):
    sp = proto.SolverParameter(base_lr=0.1, momentum=0.9, weight_decay=0.0)
    for k, v in kw.items():
        if isinstance(v, list):
            getattr(sp, k).extend(v)
        else:
            setattr(sp, k, v)
    return sp


def test_learning_rate_policies():
    assert learning_rate(solver_param(lr_policy="fixed"), 99)[0] == np.float32(0.1)
    assert learning_rate(solver_param(lr_policy="exp", gamma=0.5), 3)[0] == np.float32(0.0125)
    inv = learning_rate(solver_param(lr_policy="inv", gamma=0.1, power=0.75), 10)[0]
    assert inv == pytest.approx(0.1 * 2 ** -0.75, rel=1e-6)
    ms = solver_param(lr_policy="multistep", gamma=0.1, stepvalue=[5, 8])
    rates = []
    step = 0
    for it in range(10):
        r, step = learning_rate(ms, it, step)
        rates.append(float(r))
    assert rates[:5] == pytest.approx([0.1] * 5) and rates[5:8] == pytest.approx([0.01] * 3)
    assert rates[8:] == pytest.approx([0.001] * 2, rel=1e-5)
    sig = learning_rate(solver_param(lr_policy="sigmoid", gamma=-0.5, stepsize=4), 4)[0]
    assert sig == pytest.approx(0.05)
    sd = solver_param(lr_policy="stepdecr", gamma=0.3, stepsize=10, min_lr=0.02)
    assert [float(learning_rate(sd, it)[0]) for it in (0, 10, 20, 30, 90)] == pytest.approx(
        [0.1, 0.07, 0.04, 0.02, 0.02], rel=1e-6)
    with pytest.raises(ValueError, match="unknown lr_policy 'cosine'"):
        learning_rate(solver_param(lr_policy="cosine"), 0)


def test_update_rule_lr_after_momentum_and_clipping():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    p.lr_mult, p.decay_mult = 2.0, 1.0
    sp = solver_param(lr_policy="step", gamma=0.1, stepsize=1, weight_decay=0.01, clip_gradients=1.0)
    solver = SGDSolver(sp, [p])

    def fb(k):
        (p * torch.tensor([3.0, 4.0])).sum().backward()  # gradient (3, 4): norm 5, clipped to 1
        return 0.0

    solver.step(fb)
    g = torch.tensor([0.6, 0.8]) + 0.01 * torch.tensor([1.0, -2.0])
    v1 = 0.1 * 2 * g
    torch.testing.assert_close(p.data, torch.tensor([1.0, -2.0]) - v1)
    w1 = p.data.clone()
    solver.step(fb)  # rate 0.01 now: Caffe multiplies the rate into the new term only
    v2 = 0.9 * v1 + 0.01 * 2 * (torch.tensor([0.6, 0.8]) + 0.01 * w1)
    torch.testing.assert_close(p.data, w1 - v2)


def test_update_groups_parameters_by_their_multipliers():
    """Parameters with different lr_mult / decay_mult, L1 and L2, iter_size 2: each gets Caffe's
    update with its own multipliers (the update runs parameters that share them together)."""
    for reg in ("L2", "L1"):
        ps = [torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([0.5])),
              torch.nn.Parameter(torch.tensor([-3.0, 4.0, 0.0]))]
        for p, (lr, decay) in zip(ps, [(1.0, 1.0), (2.0, 0.0), (1.0, 1.0)]):
            p.lr_mult, p.decay_mult = lr, decay
        sp = solver_param(lr_policy="fixed", weight_decay=0.1, iter_size=2, regularization_type=reg)
        solver = SGDSolver(sp, ps)
        start = [p.detach().clone() for p in ps]
        grads = [torch.tensor([3.0, 4.0]), torch.tensor([1.0]), torch.tensor([-1.0, 2.0, 5.0])]

        def fb(k):
            sum((p * g).sum() for p, g in zip(ps, grads)).backward()
            return 0.0

        solver.step(fb)
        for p, w, g in zip(ps, start, grads):
            reg_term = w if reg == "L2" else torch.sign(w)
            diff = 2 * g / 2 + 0.1 * p.decay_mult * reg_term
            torch.testing.assert_close(p.data, w - sp.base_lr * p.lr_mult * diff)


def make_run(tmp_path):
    sp, net, solver = golden_setup("step")
    sp.snapshot_prefix = str(tmp_path / "snap")

    def noisy_feeder(t):
        def fb(k):
            noise = torch.randn(4, 3, 7, 5) * 0.1  # uses torch's RNG: resume must restore it
            d = np.load(GOLDEN / "data.npz")
            b = 2 * t + k
            blobs = net({"data": torch.from_numpy(d["data"][4 * b:4 * b + 4]) + noise,
                         "label": torch.from_numpy(d["label"][4 * b:4 * b + 4])})
            loss = net.loss(blobs)
            loss.backward()
            return loss.item()
        return fb
    return net, solver, noisy_feeder


def test_resume_is_bit_exact(tmp_path):
    torch.manual_seed(123)
    net_a, solver_a, feed_a = make_run(tmp_path / "a")
    for t in range(6):
        solver_a.step(feed_a(t))

    torch.manual_seed(123)
    net_b, solver_b, feed_b = make_run(tmp_path / "b")
    for t in range(3):
        solver_b.step(feed_b(t))
    weights, state = solver_b.snapshot(str(tmp_path / "snap"))
    torch.manual_seed(999)  # a different process state before the resume
    net_c, solver_c, feed_c = make_run(tmp_path / "c")
    solver_c.restore(state, load_weights=net_c.load_caffemodel)
    assert solver_c.iter == 3
    for t in range(3, 6):
        solver_c.step(feed_c(t))
    for (name, xs), (_, ys) in zip(net_a.layer_blobs().items(), net_c.layer_blobs().items()):
        for x, y in zip(xs, ys):
            assert torch.equal(x, y), name


def test_snapshot_crash_keeps_the_previous_one(tmp_path, monkeypatch):
    net, solver, feed = make_run(tmp_path)
    solver.step(feed(0))
    weights, state = solver.snapshot(str(tmp_path / "snap"))
    before = Path(state).read_bytes()
    solver.iter = 0  # the next snapshot writes the same names

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        solver.snapshot(str(tmp_path / "snap"))
    monkeypatch.undo()
    assert Path(state).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(weights).name, Path(state).name])


def test_bad_input(tmp_path):
    bad = tmp_path / "solver.prototxt"
    bad.write_text('base_lr: 0.1\nlr_policy: "step"\nlearning_rate: 3\n')
    with pytest.raises(cio.CaffeFormatError, match=r"solver.prototxt, line 3: .*no field named "
                                                   r"\"learning_rate\""):
        cio.read_prototxt(bad, proto.SolverParameter)
    with pytest.raises(FileNotFoundError, match=r"\.solverstate not found"):
        golden_setup("step")[2].restore(tmp_path / "none.solverstate")
    other = SGDSolver(solver_param(lr_policy="fixed"), [torch.nn.Parameter(torch.zeros(3))])
    other.layer_blobs = lambda: {"x": [other.entries[0]["param"]]}
    _, state = other.snapshot(str(tmp_path / "other"))
    with pytest.raises(cio.CaffeFormatError, match=r"1 history blobs, this net has 6 learnable "
                                                   r"parameters \(another network\?\)"):
        golden_setup("step")[2].restore(state)


def test_every_shipped_solver_file_is_usable():
    folder = Path(__file__).resolve().parents[1] / "prototxt_equiv"
    from mspcnn.train_net import read_train_net

    files = sorted(folder.glob("solver_*.prototxt"))
    assert len(files) == 10
    for path in files:
        sp = cio.read_prototxt(path, proto.SolverParameter)
        net = read_train_net(sp, str(path))  # the net it names is one mspcnn trains
        assert ("loss_low" in net.layers) == ("stage2" in path.name), path.name
        assert ("stage2" in sp.train_state.stage) == ("stage2" in path.name), path.name
        rates = [float(learning_rate(sp, it)[0]) for it in range(0, sp.max_iter, max(1, sp.max_iter // 7))]
        assert all(0 < r <= sp.base_lr + 1e-9 for r in rates), path.name
        assert rates == sorted(rates, reverse=True), path.name  # every recipe decays


def test_snapshots_hold_no_code_and_are_checked(tmp_path):
    """Random states are stored as plain data; a snapshot with a pickled random state (the old
    format, or a crafted one) is refused before anything is unpickled; learned_net cannot leave
    the snapshot's folder; a .caffemodel from another run is refused; a valid snapshot resumes."""
    import pickle

    net, solver, feed = make_run(tmp_path / "a")
    solver.step(feed(0))
    weights, state_path = solver.snapshot(str(tmp_path / "snap"))
    state = cio.read_solverstate(state_path)
    assert len(state.numpy_rng_state.key) == 624 and state.torch_rng_state
    mask = os.umask(0)
    os.umask(mask)
    for path in (weights, state_path):  # the user's umask, not mkstemp's 0600
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
    assert state.learned_net_sha256 and not state.HasField("rng_state")

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    crafted = proto.SolverState()
    crafted.CopyFrom(state)
    crafted.rng_state = pickle.dumps({"torch": None, "numpy": None, "extra": Payload()})
    bad = tmp_path / "crafted.solverstate"
    bad.write_bytes(crafted.SerializeToString())
    fresh_net, fresh, _ = make_run(tmp_path / "b")
    with pytest.raises(cio.CaffeFormatError, match="stores its random states with pickle"):
        fresh.restore(bad, load_weights=fresh_net.load_caffemodel)
    assert not marker.exists() and fresh.iter == 0

    for name in ("../snap_iter_1.caffemodel", str(Path(weights).resolve()), ".."):
        crafted = proto.SolverState()
        crafted.CopyFrom(state)
        crafted.learned_net = name
        bad.write_bytes(crafted.SerializeToString())
        with pytest.raises(cio.CaffeFormatError, match="is not a file name in the snapshot's folder"):
            fresh.restore(bad, load_weights=fresh_net.load_caffemodel)

    other_net, other, other_feed = make_run(tmp_path / "c")
    other.step(other_feed(0))
    other.step(other_feed(1))
    other_weights, _ = other.snapshot(str(tmp_path / "other"))
    Path(weights).write_bytes(Path(other_weights).read_bytes())  # another run's weights, same name
    with pytest.raises(cio.CaffeFormatError, match="is not the weights file this snapshot was written with"):
        fresh.restore(state_path, load_weights=fresh_net.load_caffemodel)
    assert fresh.iter == 0
