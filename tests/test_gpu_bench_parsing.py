"""The GPU suite's parsers and choices, on CPU: what bench/gpu/ncu.py keeps of Nsight Compute's details CSV, how
bench/gpu/adapter.py combines the timed design knobs."""
from bench.gpu.adapter import _tile_env, best_env
from bench.gpu.ncu import summarize

CSV = '''==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1","python3","h","_bwd_rows_kernel","1","7","(256, 1, 1)","(1024, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","msecond","1.02"
"0","1","python3","h","_bwd_rows_kernel","1","7","(256, 1, 1)","(1024, 1, 1)","0","9.0","GPU Speed Of Light Throughput","DRAM Throughput","%","31.5"
"0","1","python3","h","_bwd_rows_kernel","1","7","(256, 1, 1)","(1024, 1, 1)","0","9.0","Memory Workload Analysis","L2 Hit Rate","%","88.1"
"1","1","python3","h","_mm_acc_kernel","1","7","(256, 1, 1)","(384, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","usecond","251.30"
"1","1","python3","h","_mm_acc_kernel","1","7","(256, 1, 1)","(384, 1, 1)","0","9.0","Launch Statistics","Registers Per Thread","register/thread","178"
"1","1","python3","h","_mm_acc_kernel","1","7","(256, 1, 1)","(384, 1, 1)","0","9.0","Occupancy","Theoretical Occupancy","%","12.5"
'''


def test_summarize_keeps_the_listed_metrics_in_microseconds():
    rows = summarize(CSV)
    assert [r["kernel"] for r in rows] == ["_bwd_rows_kernel", "_mm_acc_kernel"]
    assert rows[0] == {"kernel": "_bwd_rows_kernel", "us": "1020.0", "dram_pct": "31.5", "l2_hit_pct": "88.1"}
    assert rows[1] == {"kernel": "_mm_acc_kernel", "us": "251.3", "regs": "178"}


def test_summarize_of_no_csv_is_empty():
    assert summarize("==ERROR== the profiler could not start") == []


def test_tile_env_parses_every_form():
    assert _tile_env("32x128x4/128x64x8") == {"EFFIR_ADAPTER_FWD_TILE": "32x128x4",
                                              "EFFIR_ADAPTER_BWD_TILE": "128x64x8"}
    assert _tile_env("64x64x4") == {"EFFIR_ADAPTER_TILE": "64x64x4"}
    assert _tile_env("EFFIR_ADAPTER_FWD_STAGES=3,EFFIR_ADAPTER_BWD_STAGES=1") == {
        "EFFIR_ADAPTER_FWD_STAGES": "3", "EFFIR_ADAPTER_BWD_STAGES": "1"}


def test_best_env_takes_forward_knobs_from_the_fastest_forward_and_the_rest_from_the_fastest_backward():
    """The forward's knobs (EFFIR_ADAPTER_FWD_*) come from the row with the fastest forward kernel, all others from
    the row with the least backward GPU time (GEMMs and sums included); a shared tile splits by kernel."""
    rows = [{"env": {}, "fwd_us": 296.0, "bwd_us": 581.0, "bwd_all_us": 720.0},
            {"env": _tile_env("EFFIR_ADAPTER_A_SCRATCH=0,EFFIR_ADAPTER_FWD_STAGES=1,EFFIR_ADAPTER_BWD_STAGES=3"),
             "fwd_us": 297.0, "bwd_us": 560.0, "bwd_all_us": 650.0},
            {"env": _tile_env("EFFIR_ADAPTER_FWD_STAGES=4,EFFIR_ADAPTER_BWD_STAGES=1"), "fwd_us": 280.0,
             "bwd_us": 600.0, "bwd_all_us": 740.0},
            {"env": _tile_env("16x128x4/128x64x8"), "fwd_us": 290.0, "bwd_us": 590.0, "bwd_all_us": 730.0}]
    env, fwd, bwd = best_env(rows)
    assert (fwd, bwd) == ("default", "default")
    assert env == {"EFFIR_ADAPTER_FWD_STAGES": "4", "EFFIR_ADAPTER_A_SCRATCH": "0", "EFFIR_ADAPTER_BWD_STAGES": "3"}
    rows[2]["fwd_us"] = 299.0  # now the 16-row forward tile is fastest, and the default backward
    rows[1]["bwd_all_us"] = 800.0
    assert best_env(rows) == ({"EFFIR_ADAPTER_FWD_TILE": "16x128x4"}, "16x128x4", "default")
    rows[0]["env"] = _tile_env("64x64x4")  # a shared tile: the backward's, when its row wins the backward
    assert best_env(rows)[0] == {"EFFIR_ADAPTER_FWD_TILE": "16x128x4", "EFFIR_ADAPTER_BWD_TILE": "64x64x4"}
