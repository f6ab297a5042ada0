"""bench/profile_train_step.py's reading of a torch.profiler Chrome trace, on a small trace written by hand:
which CPU work the GPU's idle gaps go to, and how late the kernel after each gap was launched."""
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
NO_OP = "(no op: Python or other threads)"
STEP = "train.py(10): step"
LIGER = "LigerRMSNormFunctionBackward"


@pytest.fixture
def profile_train_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import profile_train_step

    yield profile_train_step
    sys.modules.pop("profile_train_step", None)


def event(cat, name, ts, dur, tid=1, pid=1, correlation=None):
    """One complete event ("ph": "X") as torch.profiler writes it."""
    args = {} if correlation is None else {"correlation": correlation}
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args}


def kernel(name, ts, dur, correlation, cat="kernel", stream=7):
    return event(cat, name, ts, dur, tid=stream, pid=0, correlation=correlation)


def launch(ts, correlation, dur=5, name="cudaLaunchKernel"):
    return event("cuda_runtime", name, ts, dur, correlation=correlation)


def trace():
    """Three GPU gaps, in us: [1100, 2100] before kernel_b, launched 800 us late inside aten::zeros inside
    LigerRMSNormFunctionBackward (5 deep, with 100 + 50 us of no op on the launching thread); [2180, 2500] before
    kernel_e, launched before the gap began, inside aten::empty; [2510, 3030] before kernel_f, whose launch
    is not in the trace. The 15 us gap before the memset at 2165 is too short to count."""
    return {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "GPU 0"}},
        kernel("kernel_a", 1000, 100, correlation=1),
        kernel("kernel_d", 1020, 50, correlation=4, stream=8),  # inside kernel_a on another stream
        kernel("kernel_b", 2100, 50, correlation=2),
        kernel("Memset (Device)", 2165, 15, correlation=3, cat="gpu_memset"),
        kernel("kernel_e", 2500, 10, correlation=5),
        kernel("kernel_f", 3030, 10, correlation=99),
        launch(900, correlation=1),
        launch(910, correlation=4),
        event("user_annotation", "ProfilerStep#3", 1200, 850),
        event("python_function", STEP, 1250, 770),
        event("cpu_op", LIGER, 1300, 700),
        event("cpu_op", "aten::zeros", 1800, 150),
        event("cpu_op", "aten::fill_", 1800, 50),  # opened with aten::zeros, and shorter: inside it
        launch(1900, correlation=2, dur=10),
        launch(2120, correlation=3, name="cudaMemsetAsync"),
        event("cpu_op", "aten::empty", 2100, 200),
        launch(2150, correlation=5),
        event("cpu_op", "aten::mm", 1000, 2000, tid=2),  # another thread: not the launching one
        event("gpu_user_annotation", "not CPU work", 1100, 1000, tid=7, pid=0),
    ]}


def table(text, header):
    """The rows under the line starting with header: {name: (ms as printed, number of gaps)}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 1
    rows = {}
    for line in lines[start:]:
        match = re.fullmatch(r" *(\d+\.\d\d) ms +(\d+) x  (.+)", line)
        if not match:
            break
        rows[match[3]] = (match[1], int(match[2]))
    return rows


def test_idle_gaps_go_to_the_innermost_cpu_event_of_the_launching_thread(profile_train_step):
    text = profile_train_step.idle_cpu(trace())
    print(text)
    assert text.splitlines()[0] == ("GPU idle: 1.84 ms in 3 gaps over 20 us; the kernel after the gap launched "
                                    "after it began in 1 gaps, 0.80 ms late in all")
    assert table(text, "CPU on the launching thread") == {
        LIGER: ("0.55", 1), NO_OP: ("0.35", 2), "(launch not in the trace)": ("0.52", 1),
        "aten::zeros": ("0.09", 1), "aten::fill_": ("0.05", 1), "aten::empty": ("0.12", 1),
        "ProfilerStep#3": ("0.08", 1), STEP: ("0.07", 1), "cudaLaunchKernel": ("0.01", 1)}
    assert table(text, "the same by stack") == {
        f"{LIGER} < {STEP} < ProfilerStep#3": ("0.55", 1),
        NO_OP: ("0.35", 2),
        "(launch not in the trace)": ("0.52", 1),
        f"aten::zeros < {LIGER} < {STEP} < ProfilerStep#3": ("0.09", 1),
        f"aten::fill_ < aten::zeros < {LIGER} < {STEP}": ("0.05", 1),
        "aten::empty": ("0.12", 1),
        "ProfilerStep#3": ("0.08", 1),
        f"{STEP} < ProfilerStep#3": ("0.07", 1),
        f"cudaLaunchKernel < aten::zeros < {LIGER} < {STEP}": ("0.01", 1)}  # the innermost and 3 enclosing
    assert text.splitlines()[-3:] == [
        f"    0.100    1.000    0.800  kernel_b  |  {NO_OP}",
        "    1.510    0.520        -  kernel_f  |  (launch not in the trace)",
        "    1.180    0.320        -  kernel_e  |  aten::empty"]


def test_rows_limits_the_tables(profile_train_step):
    text = profile_train_step.idle_cpu(trace(), rows=2)
    assert list(table(text, "CPU on the launching thread")) == [LIGER, "(launch not in the trace)"]
    assert len(table(text, "the same by stack")) == 2


def test_gaps_of_20_us_or_less_are_not_idle(profile_train_step):
    short = {"traceEvents": [kernel("kernel_a", 1000, 100, 1), kernel("kernel_b", 1120, 10, 2), launch(1500, 2)]}
    assert profile_train_step.idle_cpu(short) == "GPU idle: no gaps over 20 us"
    gaps = profile_train_step.device_gaps(trace()["traceEvents"])
    assert [(start, end, op["name"]) for start, end, op in gaps] == [
        (1100, 2100, "kernel_b"), (2180, 2500, "kernel_e"), (2510, 3030, "kernel_f")]


def test_allocator_counts_are_differences(profile_train_step):
    start = {"num_alloc_retries": 1, "num_device_alloc": 10, "num_device_free": 2}
    end = {"num_alloc_retries": 4, "num_device_alloc": 15, "num_device_free": 2, "num_sync_all_streams": 3}
    assert profile_train_step.allocator_counts(start, end) == (
        "caching allocator over 2 steps: num_alloc_retries 3, num_device_alloc 5, num_device_free 0, "
        "num_sync_all_streams 3")


def test_gpu_only_gaps_are_named_by_the_device_ops_around_them(profile_train_step):
    """--gpu-only: no CPU work to split a gap over, so each is named by the ops before and after it (the
    op before is the one that ended last, on any stream: kernel_a, not kernel_d inside it)."""
    text = profile_train_step.gap_neighbours(trace())
    assert text.splitlines()[0] == "GPU idle: 1.84 ms in 3 gaps over 20 us"
    assert table(text, "by the device op before") == {
        "kernel_a": ("1.00", 1), "kernel_e": ("0.52", 1), "Memset (Device)": ("0.32", 1)}
    assert text.splitlines()[-3:] == [
        "    0.100    1.000  kernel_a  |  kernel_b",
        "    1.510    0.520  kernel_e  |  kernel_f",
        "    1.180    0.320  Memset (Device)  |  kernel_e"]
    short = {"traceEvents": [kernel("kernel_a", 1000, 100, 1), kernel("kernel_b", 1120, 10, 2)]}
    assert profile_train_step.gap_neighbours(short) == "GPU idle: no gaps over 20 us"


def test_python_self_time_excludes_what_a_function_encloses(profile_train_step):
    """--stack: a Python function's self time is its time less that of the events directly inside it
    (a Python call or an op), summed by function and caller, on the thread that launched the kernels."""
    events = trace()
    events["traceEvents"] += [event("python_function", "lora.py(5): helper", 1260, 30),
                              event("python_function", "module.py(2882): named_modules", 2025, 20),
                              event("python_function", "other thread", 1000, 500, tid=2)]
    text = profile_train_step.python_self_time(events)
    assert text.splitlines() == [
        "Python self time on the launching thread: 0.09 ms over 2 steps; the most, by function < caller (ms):",
        f"     0.04 ms  {STEP} < ProfilerStep#3",  # 770 us less LIGER's 700 and the helper's 30
        f"     0.03 ms  lora.py(5): helper < {STEP}",
        "     0.02 ms  module.py(2882): named_modules < ProfilerStep#3"]
    assert profile_train_step.python_self_time({"traceEvents": [kernel("kernel_a", 0, 1, 1)]}) == (
        "Python self time: no launches in the trace")


def test_settings_are_config_fields_by_section(profile_train_step, capsys):
    args = profile_train_step.parse_args(["gpu_memory_gib=79.2", "fast.torch_compile=true", "--stack"])
    assert args.stack and not args.gpu_only
    assert profile_train_step.settings_dict(args.settings) == {"train": {"gpu_memory_gib": 79.2},
                                                                "fast": {"torch_compile": True}}
    with pytest.raises(SystemExit):
        profile_train_step.parse_args(["gpu_memory_gib"])
    assert "SECTION.SETTING=VALUE" in capsys.readouterr().err
