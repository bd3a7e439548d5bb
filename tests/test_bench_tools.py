"""The benchmarks' own arithmetic, without timings: Nsight Compute's CSV read by tools/bench_ncc.py
(with a stand-in for ncu, since this machine has no GPU), and the work counted by
tools/bench_train.py --roofline."""
import os
import stat
import sys

import numpy as np
import pytest
import torch

from conftest import load_tool

bench_ncc = load_tool("bench_ncc")
bench_train = load_tool("bench_train")

KERNEL = ("void mspcnn::cuda::(anonymous namespace)::max_fast_kernel<float, 5, 5, 1>"
          "(mspcnn::NccGeometry, int, int, int, const T1 *, const T1 *, T1 *, long *)")
HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def csv_rows(kid, kernel, metrics):
    return [f'"{kid}","4242","python3","127.0.0.1","{kernel}","1","7","(32, 28, 1)","(1024, 1, 1)","0","9.0",'
            f'"Command line profiler metrics","{name}","{unit}","{value}"' for name, unit, value in metrics]


def sample_output():
    m = bench_ncc.NCU_METRICS
    k0 = [(m["time_s"], "usecond", "2,560.00"), (m["ffma"], "inst", "1,000,000,000"), (m["fadd"], "inst", "200,000,000"),
          (m["fmul"], "inst", "100,000,000"), (m["dfma"], "inst", "0"), (m["dadd"], "inst", "0"), (m["dmul"], "inst", "0"),
          (m["dram_read_B"], "Mbyte", "66.06"), (m["dram_write_B"], "Mbyte", "99.09"),
          (m["sm_throughput_pct"], "%", "53.10"), (m["registers"], "register/thread", "64")]
    k1 = [(m["time_s"], "nsecond", "1,210,000"), (m["ffma"], "inst", "50,000,000"), (m["dfma"], "inst", "4,000,000"),
          (m["dadd"], "inst", "n/a"), (m["dram_read_B"], "Gbyte", "0.1"), (m["dram_write_B"], "byte", "0")]
    lines = ["==PROF== Connected to process 4242 (/usr/bin/python3.11)", "some output of the program",
             "==PROF== Profiling \"max_fast_kernel\": 0%....50%....100% - 12 passes", HEADER]
    lines += csv_rows(0, KERNEL, k0) + csv_rows(1, "void mspcnn::cuda::max_backward_fused<float>(int)", k1)
    lines += ["==PROF== Disconnected from process 4242"]
    return "\n".join(lines) + "\n"


CEILINGS = {"fp32_matmul_TFMAps": 25.0, "copy_bandwidth_GBps": 4000.0}


def test_ncu_csv_is_read_by_column_name_with_units():
    kernels = bench_ncc.parse_ncu_csv(sample_output())
    assert [k["id"] for k in kernels] == [0, 1]
    k0, k1 = kernels
    assert k0["time_s"] == pytest.approx(2.56e-3) and k1["time_s"] == pytest.approx(1.21e-3)
    assert k0["ffma"] == 1e9 and k0["dram_read_B"] == pytest.approx(66.06e6) and k1["dram_read_B"] == pytest.approx(1e8)
    assert k0["registers"] == 64 and "dadd" not in k1  # "n/a" is left out, not read as 0


def test_ncu_summary_counts_fma_twice_and_compares_with_the_ceilings():
    s = bench_ncc.ncu_summary(bench_ncc.parse_ncu_csv(sample_output()), CEILINGS)
    k0, k1 = s["kernels"]
    assert k0["kernel"] == "max_fast_kernel<float, 5, 5, 1>"
    assert k0["fp32_flop"] == 2 * 1e9 + 2e8 + 1e8
    assert k0["fraction_of_fp32_peak"] == pytest.approx(2.3e9 / 2.56e-3 / 50e12)
    assert k0["fraction_of_bandwidth"] == pytest.approx((66.06e6 + 99.09e6) / 2.56e-3 / 4e12)
    assert k1["fp64_flop"] == 8e6 and k1["fp32_flop"] == 1e8
    t = s["total"]
    assert t["time_ms"] == pytest.approx(3.77) and t["fp32_flop"] == 2.4e9
    assert t["fraction_of_fp32_peak"] == pytest.approx(2.4e9 / 3.77e-3 / 50e12)


def test_ncu_csv_errors_say_what_is_missing():
    with pytest.raises(ValueError, match="no CSV table"):
        bench_ncc.parse_ncu_csv("==PROF== ERR_NVGPUCTRPERM - no permission\n")
    with pytest.raises(ValueError, match="Metric Value"):
        bench_ncc.parse_ncu_csv('"ID","Kernel Name","Metric Name","Metric Unit"\n"0","k","m","u"\n')


def test_ncu_profile_runs_ncu_around_a_child_and_keeps_the_raw_output(tmp_path):
    """A stand-in for ncu that checks its command line and prints a recorded table."""
    sample = tmp_path / "sample.csv"
    sample.write_text(sample_output())
    args_file = tmp_path / "args.txt"
    fake = tmp_path / "ncu"
    fake.write_text(f"#!{sys.executable}\nimport sys\nopen({str(args_file)!r}, 'w').write('\\n'.join(sys.argv[1:]))\n"
                    f"sys.stdout.write(open({str(sample)!r}).read())\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    res = bench_ncc.ncu_profile(str(fake), "ncc_max", "fwd+bwd", 128, "float32", CEILINGS, raw_dir=str(tmp_path / "raw"))
    assert "error" not in res, res
    assert res["total"]["fp32_flop"] == 2.4e9
    argv = args_file.read_text().split("\n")
    assert argv[:6] == ["--csv", "--profile-from-start", "off", "--clock-control", "none", "--metrics"]
    assert set(argv[6].split(",")) == set(bench_ncc.NCU_METRICS.values())
    assert argv[-5:] == ["--ncu-child", "ncc_max", "fwd+bwd", "128", "float32"]
    assert (tmp_path / "raw" / "ncu_ncc_max_fwd_bwd_128.csv").read_text().startswith("==PROF==")
    # ncu that cannot read the counters: an error entry, not an exception
    fake.write_text("#!/bin/sh\necho '==ERROR== Failed to initialize the profiler: LibraryNotLoaded' >&2\nexit 1\n")
    res = bench_ncc.ncu_profile(str(fake), "ncc_max", "fwd", 128, "float32", CEILINGS)
    assert "LibraryNotLoaded" in res["error"] and "exit status 1" in res["error"]


def test_tensor_core_counters_are_asked_for_only_where_ncu_lists_them(tmp_path):
    """ncu_supported keeps the optional (tensor-core) metrics whose base names `ncu --query-metrics`
    lists (one unknown name would fail a whole profile); the summary reports them per kernel."""
    listing = ("Device NVIDIA H200 (GH100)\n-----\nMetric Name  Metric Type  Metric Unit  Metric Description\n"
               "sm__ops_path_tensor_src_tf32_dst_fp32  Counter    # of math ops executed in Tensor path\n"
               "sm__pipe_tensor_op_hmma_cycles_active  Counter  cycle  # of cycles where HMMA pipe was active\n")
    fake = tmp_path / "ncu"
    fake.write_text(f"#!{sys.executable}\nimport sys\nassert sys.argv[1:] == ['--query-metrics']\n"
                    f"sys.stdout.write({listing!r})\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    found = bench_ncc.ncu_supported(str(fake), bench_ncc.NCU_OPTIONAL_METRICS)
    assert set(found) == {"tensor_ops", "tensor_pipe_pct"}
    fake.write_text("#!/bin/sh\nexit 1\n")
    assert bench_ncc.ncu_supported(str(fake), bench_ncc.NCU_OPTIONAL_METRICS) == {}
    assert bench_ncc.ncu_supported(str(tmp_path / "absent"), bench_ncc.NCU_OPTIONAL_METRICS) == {}
    m = {**bench_ncc.NCU_METRICS, **bench_ncc.NCU_OPTIONAL_METRICS}
    rows = [(m["time_s"], "msecond", "0.5"), (m["ffma"], "inst", "1,000"), (m["tensor_ops"], "", "48,234,496,000"),
            (m["tensor_pipe_pct"], "%", "41.5")]
    text = "\n".join([HEADER] + csv_rows(0, "void mspcnn::cuda::max_tc_kernel<5, 5, 1>(int)", rows)) + "\n"
    e = bench_ncc.ncu_summary(bench_ncc.parse_ncu_csv(text), CEILINGS)["kernels"][0]
    assert e["kernel"] == "max_tc_kernel<5, 5, 1>" and e["tensor_pipe_pct"] == 41.5
    assert e["tensor_ops_per_s"] == pytest.approx(48.234496e9 / 0.5e-3) and e["fp32_flop"] == 2000


def test_ncu_detail_counters_are_summarised_and_printed(tmp_path, capsys):
    """--ncu-detail: the warp instructions, the issue share and the stall reasons, asked for where ncu
    lists them (base names, ratios included), kept per kernel and printed with the largest stalls
    first."""
    listing = ("smsp__inst_executed  Counter  inst  # of warp instructions executed\n"
               "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active  Ratio    stalls per issue\n"
               "smsp__average_warps_issue_stalled_barrier_per_issue_active  Ratio    stalls per issue\n"
               "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_atom  Counter  # of bank conflicts\n")
    fake = tmp_path / "ncu"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write({listing!r})\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    found = bench_ncc.ncu_supported(str(fake), bench_ncc.NCU_DETAIL_METRICS)
    assert set(found) == {"warp_inst", "stall_mio_throttle", "stall_barrier", "shared_atom_bank_conflicts"}
    m = {**bench_ncc.NCU_METRICS, **bench_ncc.NCU_DETAIL_METRICS}
    rows = [(m["time_s"], "msecond", "1.2"), (m["warp_inst"], "inst", "750,000,000"),
            (m["shared_atom_inst"], "inst", "13,000,000"), (m["issue_active_pct"], "%", "37.5"),
            (m["stall_mio_throttle"], "", "0.8"), (m["stall_barrier"], "", "2.5"), (m["stall_wait"], "", "0.1"),
            (m["shared_atom_bank_conflicts"], "", "4,200,000")]
    text = "\n".join([HEADER] + csv_rows(0, "void mspcnn::cuda::max_backward_fused<float, 5>(int)", rows)) + "\n"
    res = bench_ncc.ncu_summary(bench_ncc.parse_ncu_csv(text), CEILINGS)
    e = res["kernels"][0]
    assert e["warp_inst"] == 7.5e8 and e["stall_barrier"] == 2.5 and e["issue_active_pct"] == 37.5
    bench_ncc.print_ncu("ncc_max", "fwd+bwd", 128, res)
    out = capsys.readouterr().out
    assert "0.750 G warp instructions (shared loads 0.000 G, shared atomics 0.013 G)" in out
    assert "shared bank conflicts: atomics 4.2 M, issuing 38% of cycles" in out
    assert "issuing 38% of cycles" in out and "stalls per issue: barrier 2.50 mio_throttle 0.80 wait 0.10" in out


def test_find_ncu_takes_an_explicit_path_only_when_executable(tmp_path):
    f = tmp_path / "ncu"
    f.write_text("")
    assert bench_ncc.find_ncu(str(f)) is None
    f.chmod(0o755)
    assert bench_ncc.find_ncu(str(f)) == str(f)


def test_roofline_records_each_convolution_and_counts_its_work():
    """_ConvCalls sees the network's convolutions (shape, weight, stride); _conv_rate's work is the
    textbook count: forward 2 N K Ho Wo C k k, backward twice that (input and weight gradients)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 16, 1, stride=2))
    x = torch.randn(2, 3, 12, 10)
    with bench_train._ConvCalls() as calls:
        net(x).sum().backward()
    keys = sorted(calls.calls, key=lambda k: k[1][0])
    assert [(k[0], k[1], k[3]) for k in keys] == [((2, 3, 12, 10), (8, 3, 3, 3), (1, 1)),
                                                  ((2, 8, 12, 10), (16, 8, 1, 1), (2, 2))]
    assert all(n == 1 for n in calls.calls.values())
    rate, gflop = bench_train._conv_rate(keys[1], 4, False, 1)
    fwd = 2 * 4 * 16 * 6 * 5 * 8
    assert gflop * 1e9 == pytest.approx(3 * fwd) and rate > 0
    _, gflop_cl = bench_train._conv_rate(keys[0], 4, True, 1)
    assert gflop_cl * 1e9 == pytest.approx(3 * 2 * 4 * 8 * 12 * 10 * 3 * 9)


def test_emulated_cuda_forward_predicts_the_shift_helps():
    """tools/emulate_cuda_ncc.py repeats the CUDA fast kernel's float32 arithmetic in NumPy. At a
    feature mean of 10 the kernel as it was loses digits in X - n mu_a mu_b; with the plane-mean
    shift it is within the tolerance the CPU kernel meets (test_ncc_ops.py)."""
    emulate = load_tool("emulate_cuda_ncc")
    rows = {r["variant"].split(",")[-1].split("(")[0].strip(): r for r in emulate.compare(1, 1, 10.0, 0)}
    before, shifted, cpu = rows["as before"], rows["shifted"], rows["CPU kernel"]
    assert shifted["value_max_abs_error"] <= 5e-6 and cpu["value_max_abs_error"] <= 5e-6
    assert before["value_max_abs_error"] > 1e-5 > shifted["value_max_abs_error"]
    assert shifted["argmax_changes"] <= before["argmax_changes"]


def test_emulated_cuda_volume_centred_form_is_accurate_at_any_mean():
    """The CUDA ncc_volume forward's three forms, emulated on one ReLU'd pool1 plane: the box-sum
    form loses digits when the means are large (offset 10), the plane-mean shift then loses them
    on the near-flat patches that ReLU leaves (offset 0: their means sit far from the plane's), and
    the centred direct form the kernel now uses stays near float32 rounding at both."""
    emulate = load_tool("emulate_cuda_ncc")
    for offset in (0.0, 10.0):
        rows = {r["variant"]: r["volume_max_abs_error"] for r in emulate.compare_volume(1, 1, offset, 0)}
        centred = rows["CUDA volume, centred (emulated)"]
        assert centred <= 2e-6
        worse = rows["CUDA volume, box-sum form (emulated)" if offset else "CUDA volume, box-sum shifted (emulated)"]
        assert worse > 3 * centred


@pytest.mark.parametrize("patch,rows,W", [(5, 5, 28), (5, 1, 9), (3, 5, 30), (3, 3, 32)])
def test_emulated_tiled_volume_forward_is_the_direct_kernel_bit_for_bit(monkeypatch, patch, rows, W):
    """volume_tiled_kernel (MSPCNN_NCC_VOLUME_FWD=tiled), emulated with its index arithmetic: every
    output stored exactly once, and each the very float32 of the direct centred kernel (the same chain
    of fused multiply-adds from precomputed centred operands), on ReLU'd maps with a large mean; W and
    R W not multiples of 4 included (the padded tiles)."""
    emulate = load_tool("emulate_cuda_ncc")
    monkeypatch.setattr(emulate, "H", 10)
    monkeypatch.setattr(emulate, "W", W)
    rng = np.random.default_rng(patch * 10 + rows)
    a, b = (np.maximum(rng.standard_normal((10, W)), 0).astype(np.float32) + 10 for _ in range(2))
    tiled, writes = emulate.emulate_volume_tiled_plane(a, b, patch, rows)
    direct = emulate.emulate_volume_plane(a, b, "centred", patch, rows)
    assert writes.min() == writes.max() == 1
    assert np.array_equal(tiled.view(np.int32), direct.view(np.int32))


def _tiled_max_maps(kind, H, W, seed):
    """Maps for the tiled max forward's emulation: ReLU'd with a mean of 10 and a flat block (ties
    at 0 under the shift), the same with a NaN in each map, or rows anti-correlated across the maps
    (every NCC of an inner output negative at one search row, so a candidate column past W, whose
    value would be 0, must not be taken)."""
    rng = np.random.default_rng(seed)
    if kind == "anti":
        a = np.repeat(rng.random((H, 1)).astype(np.float32) * 5 + 10, W, 1)
        return a, (20 - a).astype(np.float32)
    a, b = (np.maximum(rng.standard_normal((H, W)), 0).astype(np.float32) + 10 for _ in range(2))
    a[1:5, 2:8] = 10.0
    if kind == "nan":
        a[H - 2, 1], b[2, W - 2] = np.nan, np.nan
    return a, b


@pytest.mark.parametrize("kind", ["relu", "nan", "anti"])
@pytest.mark.parametrize("patch,rows,W,H,tile_rows,ct", [
    (5, 5, 28, 12, 7, 16), (5, 1, 28, 9, None, 16), (3, 3, 20, 9, 4, 8), (3, 1, 13, 11, 5, 16),
    (5, 3, 9, 8, 3, 8), (3, 5, 32, 7, 7, 16)])
def test_emulated_tiled_max_forward_is_the_fast_kernel_bit_for_bit(monkeypatch, kind, patch, rows, W, H,
                                                                   tile_rows, ct):
    """max_tiled_kernel (MSPCNN_NCC_MAX_FWD=tiled), emulated thread by thread with its index arithmetic
    (shared-memory layout, vector loads, candidate groups, shuffles, the (value, index) table): every
    load inside its array and aligned, every output stored once, and each output max_fast_kernel's
    value and index bit for bit, with several row tiles whose rows are not a multiple of P (the
    window's slots), W not a multiple of the candidate group, ties, NaNs and all-negative rows."""
    emulate = load_tool("emulate_cuda_ncc")
    monkeypatch.setattr(emulate, "H", H)
    monkeypatch.setattr(emulate, "W", W)
    a, b = _tiled_max_maps(kind, H, W, patch * 100 + rows * 10 + W)
    tiled_v, tiled_i = emulate.emulate_max_tiled_plane(a, b, patch, rows, tile_rows=tile_rows, ct=ct)
    fast_v, fast_i = emulate.emulate_plane(a, b, patch, rows, shift=True, tile_rows=tile_rows)
    assert np.array_equal(tiled_v.view(np.int32), fast_v.view(np.int32))
    assert np.array_equal(tiled_i, fast_i)
    if kind == "anti" and rows == 1:
        assert (fast_v < 0).sum() > W  # the inputs exercise the mask of the columns past W
    if kind == "nan":
        assert 0 < np.isnan(fast_v).sum() < fast_v.size


def test_emulated_fast_kernel_window_follows_its_row_tiles(monkeypatch):
    """emulate_plane's tile_rows: the fast kernel adds its window in the order of the slots of the
    tile's staged rows, so a tile of 7 rows (not a multiple of P = 5) gives some outputs other last
    bits than one tile; the tiled kernel must follow the same tiles (fast_tiling)."""
    emulate = load_tool("emulate_cuda_ncc")
    monkeypatch.setattr(emulate, "H", 12)
    monkeypatch.setattr(emulate, "W", 28)
    a, b = _tiled_max_maps("relu", 12, 28, 1)
    one, _ = emulate.emulate_plane(a, b, 5, 5, shift=True)
    tiles, _ = emulate.emulate_plane(a, b, 5, 5, shift=True, tile_rows=7)
    assert not np.array_equal(one.view(np.int32), tiles.view(np.int32))
    np.testing.assert_allclose(one, tiles, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grad_b", [False, True])
@pytest.mark.parametrize("patch,rows,W", [(5, 5, 9), (3, 1, 6), (7, 3, 5), (3, 5, 4), (9, 3, 6), (17, 1, 5)])
def test_emulated_volume_backward_staging_reads_the_same_factors(grad_b, patch, rows, W):
    """volume_grad_tiled with its ka and kb rows staged in shared memory (2026-12-01), emulated with
    its index arithmetic: every read of the V loop lands in the staged rows, on a row that holds the
    map's factors, and V is the one read from global memory, bit for bit, for grad_a and grad_b; with
    the gradient volume read 8 terms at a time from clamped rows (patches 9 and 17: two and three
    chunks)."""
    emulate = load_tool("emulate_cuda_ncc")
    rng = np.random.default_rng(patch + rows + W)
    H = 7
    G = rng.standard_normal((rows, W, H, W))
    ka, kb = rng.random((H, W)) + 0.5, rng.random((H + rows - 1, W)) + 0.5
    staged, direct, bad = emulate.emulate_volume_grad_tiled_v(G, ka, kb, patch, rows, grad_b)
    assert bad == 0
    assert np.array_equal(staged, direct) and np.abs(direct).sum() > 0


@pytest.mark.parametrize("patch,rows,W,H", [(5, 5, 7, 6), (3, 3, 5, 4), (3, 1, 9, 3), (7, 5, 32, 3)])
def test_emulated_fused_volume_centre_sums_are_the_separate_kernels(patch, rows, W, H):
    """volume_centre_fused + volume_centre_b_sum (MSPCNN_NCC_VOLUME_CENTRE=fused, 2026-12-01), emulated
    with their index arithmetic (blocks, warps, lanes, the partial table written once an entry):
    the six per-centre arrays of volume_centre_a and volume_centre_b as written, to rounding (the
    sums run in another order and multiply by kb where those divide), with flat patches (s = 0)."""
    emulate = load_tool("emulate_cuda_ncc")
    rng = np.random.default_rng(patch + rows + W)
    G, V = rng.standard_normal((rows, W, H, W)), rng.standard_normal((rows, W, H, W))
    ma, mb = rng.random((H, W)), rng.random((H + rows - 1, W))
    sa, sb = rng.random((H, W)), rng.random((H + rows - 1, W))
    sa[0, 0] = sb[1, 1] = 0.0
    ref = emulate.volume_centre_sums(G, V, ma, sa, mb, sb, patch, rows, 0.01)
    fused = emulate.emulate_volume_centre_fused(G, V, ma, sa, mb, sb, patch, rows, 0.01)
    for name, r, f in zip(("ka", "t3a", "Ha", "kb", "t3b", "Hb"), ref, fused):
        assert r.shape == f.shape and np.abs(r).max() > 0, name
        assert np.abs(r - f).max() <= 1e-12 * np.abs(r).max(), name
    assert fused[2][0, 0] == 0.0 and fused[5][1, 1] == 0.0



@pytest.mark.parametrize("global_b", [False, True])
@pytest.mark.parametrize("patch,rows,H,W", [(5, 5, 72, 28), (3, 3, 17, 32), (5, 1, 9, 31), (3, 5, 6, 13),
                                            (5, 3, 20, 32), (5, 5, 3, 7)])
def test_emulated_max_backward_by_rows_gives_the_cpu_gradients(global_b, patch, rows, H, W):
    """max_backward_rows (MSPCNN_NCC_MAX_BWD=rows and rows_global, 2026-12-01), emulated with its index
    arithmetic (warp bands of output rows, the window's slots, the shuffles with their lanes past the
    warp masked, plain stores and atomic adds): the float64 gradients of the CPU operator to rounding,
    with W = 31 and 32 (the shuffles' edges), bands shorter than the patch (H = 3, 6, 9), ReLU'd maps
    (flat patches) and zeros in the incoming gradient; every pixel of grad_a is either stored once
    by the one band that reaches it or only added to, never both (a store after another band's add
    would lose it on the GPU)."""
    import mspcnn.ops  # noqa: F401
    emulate = load_tool("emulate_cuda_ncc")
    rng = np.random.default_rng(patch * 1000 + rows * 100 + H + W)
    A = np.maximum(rng.standard_normal((H, W)), 0)
    B = np.maximum(rng.standard_normal((H, W)), 0)
    G = rng.standard_normal((H, W))
    G[rng.random((H, W)) < 0.1] = 0
    a, b = torch.from_numpy(A)[None, None], torch.from_numpy(B)[None, None]
    _, index = torch.ops.mspcnn.ncc_max(a, b, patch, rows, 0.01)
    ga, gb = torch.ops.mspcnn.ncc_max_backward(torch.from_numpy(G)[None, None], a, b, index, patch, rows,
                                               0.01)
    GA, GB, stores, atomics = emulate.emulate_max_backward_rows(A, B, G, index[0, 0].numpy(), patch, rows,
                                                                0.01, global_b)
    for emulated, cpu in ((GA, ga[0, 0].numpy()), (GB, gb[0, 0].numpy())):
        assert np.abs(cpu).max() > 0
        assert np.abs(emulated - cpu).max() <= 1e-14 * np.abs(cpu).max()
    assert (((stores == 1) & (atomics == 0)) | ((stores == 0) & (atomics > 0))).all()
    if H == 72:
        assert (stores == 1).sum() > H * W / 2  # most rows of a tall plane take plain stores


def test_shared_atomic_rounds_model():
    """emulate_cuda_ncc.shared_atomic_rounds, the compare-and-swap model of shared float atomics (one
    lane per bank stores per round): where every output selects the candidate at its own position,
    the fused backward's warps, 32 consecutive outputs of rows 28 wide, hold 4 lanes in the next row
    whose addresses share banks with 4 of the row before (pitch 32): 2 rounds an atomic; the backward
    by rows, a warp a row of outputs, takes 1, and makes the b half of the atomics plus the flushes at
    the bands' edges. With every output selecting one candidate, the rows kernel's b atomics take 28."""
    emulate = load_tool("emulate_cuda_ncc")
    H, W, P, R = 72, 28, 5, 5
    G = np.ones((H, W))
    own = np.broadcast_to((R // 2) * W + np.arange(W), (H, W))
    made, rounds = emulate.shared_atomic_rounds(G, own, P, R, "fused")
    assert made == 2 * P * P * H * W // 32 and rounds == 2 * made
    made, rounds = emulate.shared_atomic_rounds(G, own, P, R, "rows")
    # 8 bands of 9 rows: a band adds atomically the rows another band reaches too; the first and the
    # last band 4 such rows each (7-10 and 61-64), the six others 8 (r0 - 2 .. r0 + 1, r0 + 7 .. r0 + 10)
    edge_rows = 4 + 6 * 8 + 4
    assert made == P * P * H + edge_rows and rounds == made
    one = np.full((H, W), (R // 2) * W + 7)
    made, rounds = emulate.shared_atomic_rounds(G, one, P, R, "rows")
    assert rounds == (made - edge_rows) * W + edge_rows

def test_bench_train_counts_the_operations_of_an_iteration():
    """bench_train --count-ops: the engine's default (our BatchNorm + Scale operator on the CPU) and
    the separate Caffe layers (what a GPU ran before its fused batch normalisation) differ threefold
    in PyTorch operations an iteration; the GPU's path now counts like the CPU default. Since the
    BatchNorm accumulators of a pass are updated together: 2,911 and 10,115 (were 3,854 and
    10,738)."""
    sec, ops = bench_train.measure("mspcnn", 1, 2, 2, 1, count_ops=True)
    _, ops_layers = bench_train.measure("mspcnn-torch", 1, 2, 2, 1, count_ops=True)
    assert sec > 0 and 2500 < ops < 3300 and ops_layers > 3 * ops


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_train_on_a_gpu():
    """bench_train --device cuda: the fused batch normalisation path issues about a third of the
    operations of the separate layers, and both iterations run."""
    bench_train.caffe_float32()
    sec, ops = bench_train.measure("mspcnn", 2, 4, 2, 2, device="cuda", count_ops=True)
    sec_layers, ops_layers = bench_train.measure("mspcnn-torch", 2, 4, 2, 2, device="cuda", count_ops=True)
    assert sec > 0 and sec_layers > 0 and ops_layers > 2.5 * ops


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_bench_data_pin_memory_needs_a_gpu(run_tool):
    proc = run_tool("bench_data.py", "--pin-memory")
    assert proc.returncode == 2 and "--pin-memory needs a GPU" in proc.stderr and "Traceback" not in proc.stderr
