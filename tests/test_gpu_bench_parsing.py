"""The GPU suite's parsers, on CPU: what bench/gpu/ncu.py keeps of Nsight Compute's details CSV."""
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
