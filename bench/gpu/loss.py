"""GPU section of the loss issue, called by bench/gpu_suite.py as `run(out, quick, budget_s)`.

1. Correctness on the GPU: backend "triton" (and "cuda" when the extension loads) against the float64
   reference, loss and every gradient, fp32 and bf16 inputs, with/without symmetric + groups + negatives,
   odd B / M / d; error rule of tests/_errors.py (no worse than torch's own same-dtype error x 4).
2. Forward+backward timings at B = N in {4096, 16384, 32768, 65536}, d in {384, 768}, bf16, unit-norm
   embeddings, temperature 0.05, one direction (query -> passage, in-batch negatives): effir triton (and cuda;
   also the Triton backward with dS blocks of (B + N) d entries instead of 2 (B + N) d, and with Triton GEMM
   steps instead of the default cuBLAS ones),
   the torch eager reference, torch.compile of it, sentence-transformers' MultipleNegativesRankingLoss
   (`compute_loss_from_embeddings`, scale 20), memeff `MemoryEfficientQwen3Loss` (margin 2 = no false-negative
   mask, normalized_inputs, stable=False) and inf-cl `cal_flash_loss` (head_dim 128, fp32 inside by design).
   Peers are import-guarded: a missing one is recorded as "missing"; dense peers are recorded "oom" when their
   estimated score-matrix memory would not fit (or when they raise OutOfMemoryError).
   Per row: median ms (triton.testing.do_bench), peak memory above inputs, TFLOP/s = 8 B N d / time, and the
   ratio to the bf16 matmul ceiling measured in the same run (bench/gpu/ceilings.py).
Writes out/loss.json (one file) and returns the same dict.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import torch

from bench.gpu._timing import env_vars
from tests._errors import error_bound, rel_err

from effir.backends import available_backends
from effir.losses import info_nce
from effir.ops.info_nce_triton import block_shape
from effir.reference.info_nce import info_nce_reference

# the target size first, so that the comparison is measured even when the time box runs out
SIZES = [(32768, 768)] + [(b, d) for b in (4096, 16384, 32768, 65536) for d in (384, 768) if (b, d) != (32768, 768)]
QUICK_SIZES = [(32768, 768)]
TEMPERATURE = 0.05
DEVICE = "cuda"  # a CPU smoke run of this file's logic sets "cpu", small SIZES and backends=("chunked",)




def _loss_grads(fn, q, p, neg, t):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, p, neg)]
    tt = torch.tensor(t, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device,
                      requires_grad=True)
    q_, p_, n_ = leaves
    out = fn(q_, p_, n_ if n_.shape[0] else None, tt)  # M = 0: no negatives argument at all
    w = torch.linspace(0.5, 1.5, out.numel(), device=q.device, dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * w).sum(), leaves + [tt], allow_unused=True)
    return [out] + [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves + [tt])]


# (B, M, d, dtype, symmetric+groups): few constexpr variants, because a fresh machine compiles each one
# B = 1, M = 0: one candidate, so torch's loss and gradients are exactly 0 (the first H100 run caught residues)
# B = 9000, d = 64: 2 x 36 dS blocks, so the blocked backward's multi-block GEMM steps are checked on the GPU
CASES = [(1001, 257, 768, torch.float32, False), (1001, 257, 768, torch.bfloat16, True),
         (333, 77, 129, torch.bfloat16, False), (333, 77, 129, torch.float32, True),
         (1, 0, 7, torch.float32, False), (1, 0, 7, torch.float16, True), (9000, 0, 64, torch.bfloat16, False)]
QUICK_CASES = [(1, 0, 7, torch.float32, False), (1, 0, 7, torch.float16, True), (9000, 0, 64, torch.bfloat16, False),
               (333, 77, 129, torch.bfloat16, True)]  # what changed since the last GPU run first


def correctness(backends, quick, deadline):
    rows = []
    for B, M, d, dtype, sym in (QUICK_CASES if quick else CASES):
        if time.time() > deadline:
            rows.append({"skipped": "time budget", "B": B, "d": d, "dtype": str(dtype), "ok": False})
            continue
        g = torch.Generator(device=DEVICE).manual_seed(B + d)
        x64 = torch.nn.functional.normalize(torch.randn(2 * B + M, d, generator=g, device=DEVICE,
                                                        dtype=torch.float64), dim=1)
        qg = torch.randint(0, max(1, B // 3), (B,), generator=g, device=DEVICE)
        dg = torch.randint(0, max(1, B // 3), (B + M,), generator=g, device=DEVICE)
        x = x64.to(dtype)
        q, p, neg = x[:B], x[B:2 * B], x[2 * B:]
        kw = dict(symmetric=sym, query_groups=qg if sym else None, doc_groups=dg if sym else None,
                  reduction="none")

        def ref(q, p, n, t):
            return info_nce_reference(q, p, n, temperature=t, **kw)

        want = _loss_grads(ref, q.double(), p.double(), neg.double(), TEMPERATURE)
        same = _loss_grads(ref, q, p, neg, TEMPERATURE)
        variants = [(be, be, {}) for be in backends]  # (label, backend, env knobs)
        rows_, cols_ = block_shape(B, B + M, d)
        if "triton" in backends and (B > rows_ or B + M > cols_):  # several dS blocks: every GEMM step,
            variants += [("triton-mcol", "triton", {"EFFIR_TRITON_GEMM_ORDER": "column",
                                                          "EFFIR_TRITON_LOSS_GEMM": "triton"}),
                         ("triton-tgemm", "triton", {"EFFIR_TRITON_LOSS_GEMM": "triton"})]
        for label, be, env in variants:
            try:
                with env_vars(**env):
                    got = _loss_grads(lambda q, p, n, t: info_nce(q, p, n, temperature=t, backend=be, **kw),
                                      q, p, neg, TEMPERATURE)
                errs = [rel_err(a, b) for a, b in zip(got, want)]
                bounds = [error_bound(rel_err(s, b), dtype) for s, b in zip(same, want)]
                rows.append({"backend": label,
                             "B": B, "M": M, "d": d, "dtype": str(dtype), "symmetric": sym,
                             "groups": sym, "names": ["loss", "dq", "dp", "dneg", "dt"], "errs": errs,
                             "bounds": bounds, "ok": all(e <= b for e, b in zip(errs, bounds))})
            except Exception as exc:
                rows.append({"backend": be, "B": B, "d": d, "dtype": str(dtype), "ok": False,
                             "error": f"{type(exc).__name__}: {exc}"[:400]})
    return rows


# ------------------------------------------------------------------ the contestants (q, p) -> scalar loss
def _effir(backend):
    return lambda q, p: info_nce(q, p, temperature=TEMPERATURE, backend=backend)


class _EnvBwd(torch.autograd.Function):
    """Identity on the Triton loss whose backward runs under other env knobs (a GEMM engine, a dS block size)."""

    @staticmethod
    def forward(ctx, q, p, env):
        with torch.enable_grad():
            q_, p_ = q.detach().requires_grad_(), p.detach().requires_grad_()
            loss = info_nce(q_, p_, temperature=TEMPERATURE, backend="triton")
        ctx.saved = (q_, p_, loss)
        ctx.env = env
        return loss.detach()

    @staticmethod
    def backward(ctx, g):
        q_, p_, loss = ctx.saved
        with env_vars(**ctx.env):
            return (*torch.autograd.grad(loss, (q_, p_), g), None)


def _effir_triton_env(**env):
    return lambda q, p: _EnvBwd.apply(q, p, env)


def _eager(q, p):
    return info_nce_reference(q, p, temperature=TEMPERATURE)


_COMPILED = None


def _compiled(q, p):
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_eager, dynamic=True)
    return _COMPILED(q, p)


def _st_mnrl():
    try:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    except Exception as exc:
        return None, f"missing ({type(exc).__name__}: {exc})"[:200]
    try:
        mod = MultipleNegativesRankingLoss(model=None, scale=1.0 / TEMPERATURE)
        mod.compute_loss_from_embeddings  # noqa: B018 (older versions lack it: fall through)
        return (lambda q, p: mod.compute_loss_from_embeddings([q, p], None)), None
    except Exception as exc:  # older sentence-transformers: the same math it used, written out
        from sentence_transformers import util

        note = f"compute_loss_from_embeddings unavailable ({type(exc).__name__}); util.cos_sim * scale + CE"

        def f(q, p):
            scores = util.cos_sim(q, p) * (1.0 / TEMPERATURE)
            return torch.nn.functional.cross_entropy(scores, torch.arange(q.shape[0], device=q.device))

        return f, note


def _memeff():
    try:
        from memeff import MemoryEfficientQwen3Loss
    except Exception as exc:
        return None, f"missing ({type(exc).__name__}: {exc})"[:200]
    mod = MemoryEfficientQwen3Loss(temperature=TEMPERATURE, margin=2.0, normalized_inputs=True, stable=False)
    return (lambda q, p: mod(q, p)), None


def _inf_cl():
    try:
        from inf_cl import cal_flash_loss
    except Exception as exc:
        return None, f"missing ({type(exc).__name__}: {exc})"[:200]
    return (lambda q, p: cal_flash_loss(q, p, scale=1.0 / TEMPERATURE, head_dim=128).mean()), None


def contestants(backends, quick=False):
    """name -> (fn, note, dense), in timing order: the issue's comparison (effir, memeff, inf-cl) first, so that
    a run whose time box ends early still measures it."""
    out = {f"effir_{b}": (_effir(b), None, False) for b in backends}
    for name, maker, dense in (("memeff", _memeff, False), ("inf_cl", _inf_cl, False)):
        fn, note = maker()
        out[name] = (fn, note, dense)
    if "triton" in backends:  # the backward's other settings, side by side (square dS blocks is the default)
        out["effir_triton_ds1x"] = (_effir_triton_env(EFFIR_TRITON_DS_BLOCK="1"), "EFFIR_TRITON_DS_BLOCK=1", False)
        out["effir_triton_tgemm"] = (_effir_triton_env(EFFIR_TRITON_LOSS_GEMM="triton"),
                                     "EFFIR_TRITON_LOSS_GEMM=triton", False)
    out["torch_eager"] = (_eager, None, True)
    fn, note = _st_mnrl()
    out["st_mnrl"] = (fn, note, True)
    if quick:  # its first call compiled for > 60 s on a fresh H100 machine (2026-11-27): the full run only
        out["torch_compile"] = (None, "skipped in --quick (compiles for over a minute on a fresh machine)", True)
    else:
        out["torch_compile"] = (_compiled, None, True)  # last: its first call compiles (tens of seconds)
    return out


def _time_one(fn, q, p, quick):
    """fn's forward+backward (the backward runs inside the timed step, so an env switch in fn covers it)."""
    leaves = [q.detach().requires_grad_(True), p.detach().requires_grad_(True)]

    def step():
        for x in leaves:
            x.grad = None
        fn(*leaves).backward()

    step()  # warm-up: compilation / autotuning outside the timing and the memory peak
    if DEVICE != "cuda":
        t = time.perf_counter()
        step()
        return (time.perf_counter() - t) * 1e3, 0
    import triton.testing as tt

    torch.cuda.synchronize()
    ms = tt.do_bench(step, warmup=5 if quick else 10, rep=20 if quick else 50, return_mode="median")
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return ms, torch.cuda.max_memory_allocated() - base


def _breakdown(fn, q, p):
    """Per-kernel GPU time of one forward+backward (where the time goes: forward, dS, the two GEMMs)."""
    from bench.gpu._timing import kernel_breakdown

    leaves = [q.detach().requires_grad_(True), p.detach().requires_grad_(True)]
    try:
        return kernel_breakdown(lambda: fn(*leaves).backward(), steps=2)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def timings(backends, quick, deadline, matmul_flops, rows=None):
    """Timing rows; `rows` (a list the caller may pass) fills as it goes, so an interrupted run keeps them."""
    rows = [] if rows is None else rows
    free = torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else 8 << 30
    cont = contestants(backends, quick)
    for B, d in (QUICK_SIZES if quick else SIZES):
        g = torch.Generator(device=DEVICE).manual_seed(B + d)
        x = torch.nn.functional.normalize(torch.randn(2 * B, d, generator=g, device=DEVICE), dim=1).bfloat16()
        q, p = x[:B].contiguous(), x[B:].contiguous()
        del x
        flops = 8.0 * B * B * d
        for name, (fn, note, dense) in cont.items():
            row = {"name": name, "B": B, "N": B, "d": d, "dtype": "bfloat16", "flops": flops}
            if fn is None:
                rows.append({**row, "status": note})
                continue
            # dense peers hold ~ bf16 scores + fp32 logits, softmax and grad: ~14 bytes per score
            if dense and 14.0 * B * B > 0.8 * free:
                rows.append({**row, "status": f"oom (estimated {14.0 * B * B / 2**30:.0f} GiB of scores)"})
                continue
            if time.time() > deadline:
                rows.append({**row, "status": "skipped: time budget"})
                continue
            try:
                ms, peak = _time_one(fn, q, p, quick)
                tf = flops / (ms * 1e-3)
                rows.append({**row, "status": "ok", "note": note, "fwd_bwd_ms": ms, "peak_bytes": peak,
                             "tflops": tf / 1e12,
                             "frac_of_matmul": (tf / matmul_flops) if matmul_flops else None})
                if name == "effir_triton" and (B, d) == (32768, 768) and DEVICE == "cuda":
                    rows[-1]["kernels"] = _breakdown(fn, q, p)
            except torch.OutOfMemoryError:
                rows.append({**row, "status": "oom"})
            except Exception as exc:
                rows.append({**row, "status": f"error: {type(exc).__name__}: {exc}"[:400],
                             "trace": traceback.format_exc()[-1500:]})
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        del q, p
    return rows


def _summary(rows):
    """The issue's GPU targets at B = N = 32768, d = 768 (when measured)."""
    at = {r["name"]: r for r in rows if r.get("B") == 32768 and r.get("d") == 768 and r.get("status") == "ok"}
    tri = at.get("effir_triton")
    if not tri:
        return {"note": "effir_triton not measured at B = N = 32768, d = 768"}
    s = {"triton_ms": tri["fwd_bwd_ms"], "triton_frac_of_matmul": tri.get("frac_of_matmul"),
         "triton_peak_bytes": tri["peak_bytes"],
         "inputs_bytes": 2 * 32768 * 768 * 2}
    for alt in ("effir_triton_ds1x", "effir_triton_tgemm"):
        if alt in at:
            s[f"{alt[6:]}_ms"] = at[alt]["fwd_bwd_ms"]
    for peer in ("memeff", "inf_cl", "torch_eager", "torch_compile", "st_mnrl"):
        if peer in at:
            s[f"speedup_vs_{peer}"] = at[peer]["fwd_bwd_ms"] / tri["fwd_bwd_ms"]
    return s


def best_configs() -> dict:
    """The tile configs the autotuner picked, per kernel and tuning key (to order kernels/info_nce._SHAPES)."""
    from kernels import info_nce as k

    out = {}
    for name in ("_fwd_kernel", "_bwd_dscores_kernel", "_mm_acc_kernel"):
        cache = getattr(getattr(k, name, None), "cache", None) or {}
        out[name] = {str(key): str(cfg) for key, cfg in cache.items()}
    return out


def time_target() -> dict:
    """effir triton forward+backward at B = N = 32768, d = 768, bf16 in this process: ms, peak bytes and the
    autotuner's picks (run in a child process by `full_autotune_run`)."""
    B, d = 32768, 768
    g = torch.Generator(device=DEVICE).manual_seed(B + d)
    x = torch.nn.functional.normalize(torch.randn(2 * B, d, generator=g, device=DEVICE), dim=1).bfloat16()
    ms, peak = _time_one(_effir("triton"), x[:B].contiguous(), x[B:].contiguous(), quick=True)
    return {"fwd_bwd_ms": ms, "peak_bytes": peak, "best_configs": best_configs()}


def full_autotune_run(budget_s: float) -> dict:
    """The target-size timing again in a child process with EFFIR_TRITON_AUTOTUNE=full (all 4 tile shapes per
    kernel group instead of the default first 2; the choice is made when the kernels are decorated, hence a
    new process): whether a shape outside the default pair is faster on this card."""
    import subprocess
    import sys

    code = "import json, bench.gpu.loss as L; print('RESULT' + json.dumps(L.time_target()))"
    env = dict(os.environ, EFFIR_TRITON_AUTOTUNE="full")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=budget_s, env=env,
                           cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        return {"error": f"not done after {budget_s:.0f} s"}
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        return {"error": (p.stderr or p.stdout)[-1500:]}
    out = json.loads(line[len("RESULT"):])
    print(f"  effir_triton with EFFIR_TRITON_AUTOTUNE=full: {out['fwd_bwd_ms']:.2f} ms")
    return out


def run(out, quick: bool = False, budget_s: float = 170.0, backends=None) -> dict:
    t0 = time.time()
    deadline = t0 + budget_s
    if backends is None:
        backends = [b for b in available_backends("loss", DEVICE) if b in ("triton", "cuda")]
    res = {"backends": backends}
    try:
        from bench.gpu import ceilings

        res["matmul_bf16"] = ceilings.matmul_rate(8192, reps=10) if DEVICE == "cuda" else {}
    except Exception as exc:
        res["matmul_bf16"] = {"error": f"{type(exc).__name__}: {exc}"}
    mm = res["matmul_bf16"].get("flop_per_s")
    try:
        res["correctness"] = correctness(backends, quick, t0 + 0.4 * budget_s)
    except Exception as exc:
        res["correctness"] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
    res["timing"] = []
    try:
        timings(backends, quick, deadline - 5, mm, res["timing"])
    except Exception as exc:  # the suite's time box included: the rows measured so far stay in res["timing"]
        res["timing_error"] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
    res["targets"] = _summary(res["timing"])
    try:
        res["best_configs"] = best_configs()
    except Exception as exc:
        res["best_configs"] = {"error": f"{type(exc).__name__}: {exc}"}
    if DEVICE == "cuda" and "triton" in backends and deadline - time.time() > 40:
        res["full_autotune"] = full_autotune_run(deadline - time.time() - 5)
    res["seconds"] = round(time.time() - t0, 1)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "loss.json").write_text(json.dumps(res, indent=1, default=str))
    _print_table(res)
    return res


def _print_table(res):
    print("loss section: correctness", [(r.get("backend"), r.get("dtype"), r.get("symmetric"), r.get("ok"))
                                       for r in res.get("correctness", []) if isinstance(r, dict)]
          if isinstance(res.get("correctness"), list) else res.get("correctness"))
    if isinstance(res.get("timing"), list):
        for r in res["timing"]:
            if r.get("status") == "ok":
                print(f"  {r['name']:14s} B=N={r['B']:6d} d={r['d']:4d} {r['fwd_bwd_ms']:9.2f} ms "
                      f"{r['tflops']:7.1f} TFLOP/s peak {r['peak_bytes'] / 2**20:9.1f} MiB")
            else:
                print(f"  {r['name']:14s} B=N={r['B']:6d} d={r['d']:4d} {r['status']}")
    print("  targets:", res.get("targets"))
