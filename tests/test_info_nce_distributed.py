"""gather=True with the gloo backend and 2 CPU processes: every rank's loss and gradients equal the
single-process computation over the global batch, and positives / negatives stay aligned with their queries."""
import os
import socket
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, B, M, D = 2, 5, 3, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_inputs():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(WORLD * B, D, generator=g, dtype=torch.float64)
    p = torch.randn(WORLD * B, D, generator=g, dtype=torch.float64)
    n = torch.randn(WORLD * M, D, generator=g, dtype=torch.float64)
    qg = torch.randint(0, 4, (WORLD * B,), generator=g)  # global group ids
    ng = torch.randint(0, 4, (WORLD * M,), generator=g)
    return q, p, n, qg, ng


def _worker(rank, port, configs, reports):
    """Reports ("stage", rank, what) as it goes and ("ok", rank, "") once every check passed, so the parent can
    tell a failed check from a crash, and where a crash happened."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    reports.put(("stage", rank, "initialised"))
    try:
        for backend, symmetric in configs:
            _check_rank(rank, backend, symmetric)
            reports.put(("stage", rank, f"checked {backend} symmetric={symmetric}"))
        reports.put(("ok", rank, ""))
    except Exception as exc:  # report to the parent; an exception in a spawned worker is otherwise terse
        import traceback

        reports.put(("error", rank, traceback.format_exc()))
        raise exc
    finally:
        # both ranks leave their last collective before either tears the group down: a rank whose peer had
        # already closed its gloo connections could abort in C++ ("terminate called without an active exception")
        dist.barrier()
        reports.put(("stage", rank, "tearing down"))
        dist.destroy_process_group()


def _check_rank(rank, backend, symmetric):
    from effir.distributed import gather_docs
    from effir.losses import info_nce
    from effir.reference.info_nce import info_nce_reference

    q, p, n, qg, ng = _global_inputs()
    rs, ms = slice(rank * B, (rank + 1) * B), slice(rank * M, (rank + 1) * M)
    lq, lp, ln = (x[s].clone().requires_grad_(True) for x, s in ((q, rs), (p, rs), (n, ms)))
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    ldg = torch.cat([qg[rs], ng[ms]])  # a positive shares its query's group; negatives have their own
    # layout: [all positives; all negatives], this rank's positive i at rank*B + i
    docs, dg, offset = gather_docs(lp.detach(), ln.detach(), ldg)
    assert offset == rank * B
    assert torch.equal(docs[offset:offset + B], lp.detach()), "positives misaligned after gather"
    assert torch.equal(docs[WORLD * B + rank * M:WORLD * B + (rank + 1) * M], ln.detach()), "negatives"
    assert torch.equal(docs[:WORLD * B], p) and torch.equal(docs[WORLD * B:], n)
    assert torch.equal(dg, torch.cat([qg, ng]))

    loss = info_nce(lq, lp, ln, temperature=t, symmetric=symmetric, query_groups=qg[rs], doc_groups=ldg,
                    backend=backend, gather=True)
    loss.backward()

    gq, gp, gn = (x.clone().requires_grad_(True) for x in (q, p, n))
    gt = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    rows = info_nce_reference(gq, gp, gn, temperature=gt, symmetric=symmetric, query_groups=qg,
                              doc_groups=torch.cat([qg, ng]), reduction="none")
    rows.mean().backward()
    torch.testing.assert_close(loss, rows[rs].mean(), rtol=1e-10, atol=1e-12)
    # DDP convention: the rank's gradient, averaged over ranks, is the global mean loss's gradient
    for name, local, full, s in (("q", lq, gq, rs), ("p", lp, gp, rs), ("negatives", ln, gn, ms)):
        torch.testing.assert_close(local.grad / WORLD, full.grad[s], rtol=1e-9, atol=1e-12, msg=name)
    tg = t.grad.clone()
    dist.all_reduce(tg)
    torch.testing.assert_close(tg / WORLD, gt.grad, rtol=1e-9, atol=1e-12)


CONFIGS = [("reference", False), ("chunked", False), ("chunked", True), ("reference", True)]


def test_gather_matches_global_batch():
    """One spawn (2 ranks) checks every (backend, symmetric) config: process start-up dominates the time."""
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    ctx = mp.get_context("spawn")
    reports = ctx.SimpleQueue()
    crash = None
    try:
        mp.spawn(_worker, args=(_free_port(), CONFIGS, reports), nprocs=WORLD, join=True)
    except Exception as exc:
        crash = exc
    got = []
    while not reports.empty():
        got.append(reports.get())
    errors = [f"rank {r}: {msg}" for kind, r, msg in got if kind == "error"]
    assert not errors, "\n".join(errors)
    passed = {r for kind, r, _ in got if kind == "ok"}
    if crash is not None:
        last = {r: msg for kind, r, msg in got if kind == "stage"}
        if passed == set(range(WORLD)) and all(last.get(r) == "tearing down" for r in range(WORLD)):
            # every check passed on every rank; only gloo's teardown in C++ failed: not what this test checks
            warnings.warn(f"gloo process-group teardown crashed after all checks passed: {crash}", RuntimeWarning)
            return
        pytest.fail(f"a worker crashed ({crash}); last stage per rank: {last}")
    assert passed == set(range(WORLD)), f"ranks that finished their checks: {sorted(passed)}"


def test_gather_without_process_group_is_local():
    """gather=True outside torch.distributed: world of one, same result as no gather."""
    from effir.losses import info_nce

    q, p, n, qg, ng = _global_inputs()
    a = info_nce(q, p, n, backend="chunked", gather=True)
    b = info_nce(q, p, n, backend="chunked")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
