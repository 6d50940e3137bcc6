"""GPU section of the CUDA extension (issue 6): correctness against float64, cuda vs triton timings, SASS.

Called by bench/gpu_suite.py after it has built the extension (JIT) and registered it as `effir._C`:
- correctness: backend="cuda" through the public ops (autograd included) against the float64 reference, with
  the same rule the Triton path meets (error <= 4 x max(torch's own error in the dtype, a few ulps), tests/_errors);
  every option of the loss (negatives, symmetric, groups, pos_offset) and of the adapter (activations, plain /
  LayerNorm after / LayerNorm before), fp32 / fp16 / bf16 (and fp64 for the adapter), odd shapes;
- timing: forward+backward of each op for "cuda" and "triton" at the issue's sizes (bf16), CUDA-event medians,
  with FLOP/s or bytes/s and the ratio cuda / triton (target <= 1.2);
- SASS evidence: HGMMA / HMMA / FFMA counts per kernel, registers and spills (cuobjdump on the built .so).
Each check is guarded: a failure is recorded with its error and the section goes on.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
import traceback

import torch

from bench.gpu._timing import median_ms

from tests._errors import error_bound, rel_err

DEV = "cuda"




def _judge(name, out, ref64, same, dtype) -> dict:
    err, err_t = rel_err(out, ref64), rel_err(same, ref64)
    bound = error_bound(err_t, dtype)
    finite = bool(torch.isfinite(out.detach().double()).all())
    return {"name": name, "err": err, "torch_err": err_t, "bound": bound, "ok": finite and err <= bound}


# ---------------------------------------------------------------- loss
def _loss_case(backend, B, M, d, dtype, symmetric, groups, t, seed, pos_offset=0):
    """Loss + grads of sum(w * rows) via the backend ops (cuda/triton) or the reference (backend=None)."""
    from effir.ops.info_nce import info_nce_rows
    from effir.reference.info_nce import reference_rows

    g = torch.Generator(device="cpu").manual_seed(seed)
    emb = lambda n: torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)  # noqa
    N = B + M + pos_offset
    q64, docs64 = emb(B), emb(N)
    qg = torch.randint(0, 3, (B,), generator=g) if groups else None
    dg = torch.randint(0, 3, (N,), generator=g) if groups else None
    R = 2 if symmetric else 1
    w = torch.randn(R, B, generator=g, dtype=torch.float64)
    out = {}
    for tag, dt, be in (("ref64", torch.float64, "reference"), ("same", dtype, "reference"), ("out", dtype, backend)):
        q = q64.to(dt).to(DEV).requires_grad_(True)
        docs = docs64.to(dt).to(DEV).requires_grad_(True)
        temp = torch.tensor(t, dtype=torch.float64 if dt == torch.float64 else torch.float32, device=DEV,
                            requires_grad=True)
        qgd = qg.to(DEV) if qg is not None else None
        dgd = dg.to(DEV) if dg is not None else None
        if be == "reference":
            rows = reference_rows(q, docs, temp, qgd, dgd, pos_offset, symmetric)
        else:
            rows = info_nce_rows(q, docs, temp, qgd, dgd, pos_offset, symmetric, be)
        dq, dd, dtemp = torch.autograd.grad((rows * w.to(DEV, rows.dtype)).sum(), (q, docs, temp))
        out[tag] = (rows.detach(), dq, dd, dtemp.reshape(1))
    names = ("loss_rows", "dq", "ddocs", "dtemperature")
    return [_judge(n, o, r, s, dtype) for n, o, r, s in zip(names, out["out"], out["ref64"], out["same"])]


LOSS_CASES = [  # (B, M, d, symmetric, groups, pos_offset)
    (1, 0, 7, False, False, 0), (1, 3, 1, True, False, 0), (7, 3, 64, True, True, 0),
    (129, 31, 384, True, True, 0), (200, 57, 1000, False, True, 0), (130, 0, 768, True, False, 0),
    (64, 17, 129, False, True, 64), (300, 0, 256, False, False, 0),
]


def loss_correctness(quick: bool, backends=("cuda",), deadline: float = float("inf")) -> list[dict]:
    rows = []
    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.float32, torch.float16, torch.bfloat16)
    cases = LOSS_CASES[:4] if quick else LOSS_CASES
    for backend in backends:
        for dtype in dtypes:
            for (B, M, d, sym, grp, off) in cases:
                case = dict(op="info_nce", backend=backend, dtype=str(dtype).split(".")[-1], B=B, M=M, d=d,
                            symmetric=sym, groups=grp, pos_offset=off)
                if time.time() > deadline:
                    rows.append({**case, "skipped": "time budget"})
                    continue
                try:
                    checks = _loss_case(backend, B, M, d, dtype, sym, grp, 0.05, seed=B * 7 + d, pos_offset=off)
                    rows.append({**case, "ok": all(c["ok"] for c in checks), "checks": checks})
                except Exception as exc:  # recorded, never fatal
                    rows.append({**case, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "trace": traceback.format_exc()[-1500:]})
    return rows


def loss_timing(quick: bool, deadline: float) -> list[dict]:
    from effir.ops.info_nce import info_nce_rows

    sizes = [(8192, 768)] if quick else [(4096, 768), (16384, 384), (16384, 768), (32768, 768)]
    res = []
    for B, d in sizes:
        for backend in ("cuda", "triton"):
            if time.time() > deadline:
                res.append({"B": B, "d": d, "backend": backend, "skipped": "time budget"})
                continue
            try:
                q = torch.nn.functional.normalize(torch.randn(B, d, device=DEV), dim=1).bfloat16().requires_grad_()
                docs = torch.nn.functional.normalize(torch.randn(B, d, device=DEV), dim=1).bfloat16().requires_grad_()
                temp = torch.tensor(0.05, device=DEV)

                def fwd_bwd():
                    rows = info_nce_rows(q, docs, temp, None, None, 0, False, backend)
                    rows.sum().backward()

                def fwd():
                    with torch.no_grad():
                        info_nce_rows(q, docs, temp, None, None, 0, False, backend)

                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ms = median_ms(fwd_bwd, warmup=2, reps=5 if quick else 10)
                peak = torch.cuda.max_memory_allocated() - base
                ms_f = median_ms(fwd, warmup=2, reps=5 if quick else 10)
                flops = 8.0 * B * B * d  # S forward; S again, dQ and dD backward (recompute)
                res.append({"B": B, "N": B, "d": d, "dtype": "bfloat16", "backend": backend, "fwd_bwd_ms": ms,
                            "fwd_ms": ms_f, "tflops": flops / (ms * 1e-3) / 1e12, "peak_extra_bytes": peak})
                del q, docs
            except Exception as exc:
                res.append({"B": B, "d": d, "backend": backend, "error": f"{type(exc).__name__}: {exc}"})
    return res


# ---------------------------------------------------------------- adapter
def _adapter_case(backend, M, d, r, dtype, act, variant, seed):
    from effir.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_layernorm
    from effir.reference.bottleneck_adapter import (
        bottleneck_adapter_layernorm_reference,
        bottleneck_adapter_reference,
    )

    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s, sc=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * sc  # noqa: E731
    base = dict(x=rnd(M, d), res=rnd(M, d), wd=rnd(r, d, sc=d ** -0.5), bd=rnd(r, sc=0.1), wu=rnd(d, r, sc=r ** -0.5),
                bu=rnd(d, sc=0.1), lnw=1 + rnd(d, sc=0.1), lnb=rnd(d, sc=0.1))
    dy64 = rnd(M, d)
    names = ["x", "res", "wd", "bd", "wu", "bu", "lnw", "lnb"] if variant != "plain" else ["x", "wd", "bd", "wu", "bu"]
    out = {}
    for tag, dt, be in (("ref64", torch.float64, None), ("same", dtype, None), ("out", dtype, backend)):
        t = {k: v.to(dt).to(DEV).requires_grad_(True) for k, v in base.items()}
        if variant == "plain":
            if be is None:
                y = bottleneck_adapter_reference(t["x"], t["wd"], t["bd"], t["wu"], t["bu"], activation=act, scaling=0.7)
            else:
                y = bottleneck_adapter(t["x"], t["wd"], t["bd"], t["wu"], t["bu"], activation=act, scaling=0.7,
                                       backend=be)
        else:
            kw = dict(activation=act, scaling=0.7, eps=1e-5, original_ln_before=(variant == "ln_before"))
            args = [t[k] for k in ("x", "res", "wd", "bd", "wu", "bu", "lnw", "lnb")]
            y = (bottleneck_adapter_layernorm_reference(*args, **kw) if be is None
                 else bottleneck_adapter_layernorm(*args, backend=be, **kw))
        grads = torch.autograd.grad((y * dy64.to(DEV, y.dtype)).sum(), [t[k] for k in names])
        out[tag] = [y.detach()] + list(grads)
    return [_judge(n, o, r_, s, dtype) for n, o, r_, s in zip(["y"] + ["d" + k for k in names], out["out"],
                                                             out["ref64"], out["same"])]


ADAPTER_CASES = [  # (M, d, r)
    (1, 7, 1), (7, 129, 8), (129, 384, 24), (300, 768, 48), (64, 1024, 64), (33, 768, 384),
]


def adapter_correctness(quick: bool, backends=("cuda",), deadline: float = float("inf")) -> list[dict]:
    rows = []
    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    cases = ADAPTER_CASES[:4] if quick else ADAPTER_CASES
    for backend in backends:
        for dtype in dtypes:
            for i, (M, d, r) in enumerate(cases):
                for variant in ("plain", "ln_after", "ln_before"):
                    act = ("relu", "gelu", "silu")[(i + len(variant)) % 3]
                    case = dict(op="adapter", backend=backend, dtype=str(dtype).split(".")[-1], M=M, d=d, r=r,
                                activation=act, variant=variant)
                    if time.time() > deadline:
                        rows.append({**case, "skipped": "time budget"})
                        continue
                    try:
                        checks = _adapter_case(backend, M, d, r, dtype, act, variant, seed=M + d + r)
                        rows.append({**case, "ok": all(c["ok"] for c in checks), "checks": checks})
                    except Exception as exc:
                        rows.append({**case, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                     "trace": traceback.format_exc()[-1500:]})
    return rows


def adapter_timing(quick: bool, deadline: float) -> list[dict]:
    from effir.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_layernorm

    sizes = [(65536, 768)] if quick else [(65536, 384), (65536, 768), (65536, 1024), (4096, 768)]
    res = []
    for M, d in sizes:
        r = d // 16
        for variant in ("plain", "ln_after"):
            for backend in ("cuda", "triton"):
                if time.time() > deadline:
                    res.append({"M": M, "d": d, "variant": variant, "backend": backend, "skipped": "time budget"})
                    continue
                try:
                    mk = lambda *s: (torch.randn(*s, device=DEV) * 0.1).bfloat16().requires_grad_()  # noqa: E731
                    x, res_, wd, bd, wu, bu = mk(M, d), mk(M, d), mk(r, d), mk(r), mk(d, r), mk(d)
                    lnw, lnb = mk(d), mk(d)
                    dy = torch.randn(M, d, device=DEV).bfloat16()

                    def fwd():
                        if variant == "plain":
                            return bottleneck_adapter(x, wd, bd, wu, bu, activation="relu", backend=backend)
                        return bottleneck_adapter_layernorm(x, res_, wd, bd, wu, bu, lnw, lnb, activation="relu",
                                                            backend=backend)

                    def fwd_bwd():
                        fwd().backward(dy)

                    ms = median_ms(fwd_bwd, warmup=2, reps=5 if quick else 10)
                    with torch.no_grad():
                        ms_f = median_ms(fwd, warmup=2, reps=5 if quick else 10)
                    e = 2  # bf16 bytes
                    n_in = 2 if variant == "ln_after" else 1
                    # minimal bytes: fwd reads x (+res) writes y; bwd reads x (+res), dy, writes dx (+dres)
                    min_bytes = M * d * e * ((n_in + 1) + (n_in + 1 + n_in))
                    res.append({"M": M, "d": d, "r": r, "variant": variant, "backend": backend, "fwd_bwd_ms": ms,
                                "fwd_ms": ms_f, "min_bytes": min_bytes,
                                "gbytes_per_s": min_bytes / (ms * 1e-3) / 1e9})
                except Exception as exc:
                    res.append({"M": M, "d": d, "variant": variant, "backend": backend,
                                "error": f"{type(exc).__name__}: {exc}"})
    return res


# ---------------------------------------------------------------- SASS evidence
def _demangle(name: str) -> str:
    """'_ZN5effir...grad_kernelI13__nv_bfloat16Lb1ELi256E...' -> 'grad_kernel<bf16,true,256>'."""
    try:
        d = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10).stdout.strip() or name
    except Exception:
        return name
    d = d.replace("(anonymous namespace)::", "").replace("effir::", "").replace("void ", "", 1).split("(")[0]
    return d.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace(" ", "")


def sass_evidence(so_path: str) -> dict:
    tool = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    out = {"so": so_path, "tool": tool}
    sass = subprocess.run([tool, "--dump-sass", so_path], capture_output=True, text=True, timeout=120).stdout
    per, fn, arch = {}, None, "?"
    for line in sass.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = (arch, m.group(1))
            continue
        for op in ("HGMMA", "HMMA", "FFMA", "LDL", "STL"):
            if fn and re.search(r"\b" + op + r"\b", line):
                per.setdefault(fn, {}).setdefault(op, 0)
                per[fn][op] += 1
    out["per_kernel"] = {f"{a} {_demangle(k)}": v for (a, k), v in per.items()}  # static instruction counts
    out["totals"] = {op: sum(c.get(op, 0) for c in per.values()) for op in ("HGMMA", "HMMA", "FFMA", "LDL", "STL")}
    usage = subprocess.run([tool, "--dump-resource-usage", so_path], capture_output=True, text=True, timeout=120)
    out["resource_usage"] = [ln.strip() for ln in usage.stdout.splitlines() if "REG" in ln or "Function" in ln][:200]
    return out


def run(out, quick: bool, deadline: float, so_path: str | None) -> dict:
    """All of the above, most important first; each part guarded and given a share of the time left.

    Order: SASS evidence, cuda correctness (loss, adapter), cuda vs triton timings, then the same correctness
    checks for triton (the loss / adapter sections of the suite check triton too, so it goes last).
    """
    res = {}

    def share(frac):  # a deadline for the next part: a fraction of what is left
        return time.time() + frac * max(0.0, deadline - time.time())

    parts = (
        ("sass", lambda: sass_evidence(so_path) if so_path else {"error": "no .so path"}),
        ("loss_correctness", lambda: loss_correctness(quick, ("cuda",), share(0.25))),
        ("adapter_correctness", lambda: adapter_correctness(quick, ("cuda",), share(0.3))),
        ("loss_timing", lambda: loss_timing(quick, share(0.5))),
        ("adapter_timing", lambda: adapter_timing(quick, share(0.7))),
        ("loss_correctness_triton", lambda: loss_correctness(quick, ("triton",), share(0.5))),
        ("adapter_correctness_triton", lambda: adapter_correctness(quick, ("triton",), deadline)),
    )
    for name, fn in parts:
        t0 = time.time()
        if time.time() > deadline and name != "sass":
            res[name] = {"skipped": "time budget"}
            continue
        try:
            res[name] = fn()
        except Exception as exc:
            res[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        res[name + "_s"] = round(time.time() - t0, 1)
        torch.cuda.empty_cache()
    return res
