"""Ahead-of-time compile of every Triton kernel of the repo for real NVIDIA GPUs, on a machine without one.

Why: CPU tests run the kernels under TRITON_INTERPRET=1, which bypasses Triton's compiler (no front-end checks,
no register allocation, no shared-memory budget, no tensor-core lowering). This compiles each kernel for sm_90
(H100) or sm_80 (A100) with the launch the launchers really make on a CUDA tensor, and reports registers and
spills (ptxas -v), shared memory (Triton's launch metadata), and tensor-core / local-memory instructions (SASS).

Launches are taken from the launchers themselves: `effir.ops.info_nce_triton.forward/backward` and
`fused_adapter_fwd/bwd` run on meta tensors with their kernels swapped for recorders, so pointer dtypes, int
args, constexprs and num_warps/num_stages are exactly what those functions pass. An autotuned kernel expands
into the configs its Autotuner would compile for a large problem (its configs, built with TRITON_INTERPRET
unset, through its early_config_prune; env EFFIR_TRITON_AUTOTUNE honoured). Specialisation follows Triton's JIT:
int args are i32 and, like every pointer (torch allocations are 16-byte aligned), carry `tt.divisibility=16`
when divisible by 16; an int equal to 1 becomes a constexpr. Without those hints the code is not what runs
(e.g. unvectorised loads and spills).

    python bench/triton_aot.py --arch 90 [--quick] [--out results.json]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `bench`, `effir` and `kernels` import from the source tree
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# Largest dynamic shared memory one block may opt into; Triton refuses to load a kernel above it.
SMEM_LIMIT = {90: 232448, 80: 166912}
_TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                    torch.int64: "i64", torch.int32: "i32"}
_LAYOUTS = {(False, False, False): "plain", (True, False, True): "houlsby", (False, True, True): "pfeiffer",
            (True, True, True): "pfeiffer h+t"}  # the last: forward only (its backward reads z, "pfeiffer")
# (kernel, variant) pairs of the quick subset: every kernel at 16 bits (both configs of the forward, both GEMM
# operand layouts of the blocked backward), the fp32 paths once each
QUICK = {
    ("info_nce._fwd_kernel", "bf16 d=768 no-groups 128x128x64"),
    ("info_nce._fwd_kernel", "fp16 d=768 groups 128x64x64"),
    ("info_nce._fwd_kernel", "fp32 d=768 no-groups 64x64x32"),
    ("info_nce._bwd_dscores_kernel", "bf16 d=768 groups sym 256x64x64"),
    ("info_nce._mm_acc_kernel", "bf16 d=768 stride_ak=1 stride_bn=1 mid n-fastest 256x64x64"),
    ("info_nce._mm_acc_kernel", "bf16 d=768 stride_ak=1 stride_bn=1 last n-fastest 256x64x64"),
    ("info_nce._mm_acc_kernel", "bf16 d=768 stride_am=1 stride_bn=1 single n-fastest 256x64x64"),
    ("bottleneck_adapter._fwd_kernel", "bf16 d=768 r=48 gelu houlsby"),
    ("bottleneck_adapter._fwd_kernel", "bf16 d=768 r=48 relu pfeiffer h+t writes z"),
    ("bottleneck_adapter._bwd_rows_kernel", "bf16 d=768 r=48 relu pfeiffer"),
    ("bottleneck_adapter._bwd_rows_kernel", "bf16 d=768 r=48 relu pfeiffer mixed"),
    ("bottleneck_adapter._wd_ln_kernel", "bf16 d=768 r=48 pfeiffer"),
    ("bottleneck_adapter._bwd_rows_kernel", "bf16 d=768 r=48 relu pfeiffer a-registers"),
    ("bottleneck_adapter._bwd_rows_kernel", "bf16 d=768 r=48 gelu houlsby a-scratch"),
    ("bottleneck_adapter._fwd_kernel", "fp32 d=384 r=24 relu plain"),
    ("bottleneck_adapter._bwd_rows_kernel", "fp64 d=768 r=48 gelu pfeiffer"),
}


@dataclass
class Launch:
    """One kernel compilation as the GPU JIT would see it."""

    kernel: str  # "<module>.<kernel name>"
    variant: str
    family: str  # "loss" | "adapter"
    dtype: str  # input dtype of the op (bf16 / fp16 / fp32)
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict = field(default_factory=dict)
    ones: tuple = ()  # int args equal to 1, which the JIT turns into constexprs

    def key(self) -> tuple:
        return (self.kernel, tuple(self.signature.items()), tuple(sorted((k, str(v)) for k, v in
                self.constexprs.items())), tuple(sorted(self.attrs)), tuple(sorted(self.options.items())))


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records (args, kwargs) instead of launching."""

    def __init__(self):
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def toolchain_error() -> str | None:
    """None when Triton can compile for NVIDIA targets here (backend, ptxas, cuobjdump), else why not."""
    try:
        import triton
        from triton.backends import backends
    except Exception as exc:
        return f"triton not importable: {exc}"
    if "nvidia" not in backends:
        return "Triton's NVIDIA backend is not installed"
    for tool in ("ptxas", "cuobjdump"):
        try:
            path = getattr(triton.knobs.nvidia, tool).path
            subprocess.run([path, "--version"], check=True, capture_output=True, timeout=30)
        except Exception as exc:
            return f"{tool} unavailable: {exc}"
    return None


@contextlib.contextmanager
def _compile_env(allow_nonconst_globals: bool):
    """Real-GPU compilation settings, whatever the caller's env: no interpreter (tests set TRITON_INTERPRET=1,
    which also makes `triton.jit` return interpreter objects), a throw-away cache with forced compilation (fresh
    timings and a ptxas log every time), and the ptxas -v log printed so it can be parsed."""
    saved = dict(os.environ)
    tmp = tempfile.TemporaryDirectory(prefix="triton_aot_")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=tmp.name)
    if allow_nonconst_globals:
        os.environ["TRITON_ALLOW_NON_CONSTEXPR_GLOBALS"] = "1"
    else:
        os.environ.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        tmp.cleanup()


def _fresh_module(name: str):
    """kernels/<name>.py loaded under a private name (never kernels.<name> in sys.modules, which CPU tests
    need interpreted): with TRITON_INTERPRET unset its functions are real `JITFunction`s."""
    spec = importlib.util.spec_from_file_location(f"_triton_aot_{name}", REPO / "kernels" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _jit_fn(obj):
    from triton.runtime.autotuner import Autotuner

    return obj.fn if isinstance(obj, Autotuner) else obj


def _launch(mod_name: str, kname: str, fn, args: tuple, kwargs: dict) -> Launch:
    """Signature, constexprs and divisibility attributes of one recorded call, as Triton's JIT derives them:
    scalars through Triton's own `native_specialize_impl` (i32/i64, 'D' = divisible by 16, 1 -> constexpr);
    a tensor is a pointer, 16-byte aligned when its offset into the (aligned) allocation is."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    names = fn.arg_names
    params = dict(zip(names, args))
    params.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs, ones = {}, {}, {}, []
    for i, name in enumerate(names):
        v = params[name]
        if fn.params[i].is_constexpr:
            signature[name], constexprs[name] = "constexpr", v
            continue
        if isinstance(v, torch.Tensor):
            ty, spec = "*" + _TORCH_TO_TRITON[v.dtype], "D" if v.storage_offset() * v.element_size() % 16 == 0 else ""
        else:
            ty, spec = native_specialize_impl(BaseBackend, v, False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = spec
            ones.append(name)
        elif spec and "D" in spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return Launch(kernel=f"{mod_name}.{kname}", variant="", family="", dtype="", signature=signature,
                  constexprs=constexprs, attrs=attrs, options=options, ones=tuple(ones))


def _kernels(mod) -> dict:
    """The module's kernels (`*_kernel` JITFunctions or Autotuners), by name."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    return {n: getattr(mod, n) for n in dir(mod)
            if n.endswith("_kernel") and isinstance(getattr(mod, n), (JITFunction, Autotuner))}


def _expand(mod_name: str, kname: str, kernel, args: tuple, kwargs: dict) -> list[Launch]:
    """One Launch per config an autotuned kernel would compile for this call (its early_config_prune applied,
    as Triton's Autotuner does); a plain kernel gives one."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel, Autotuner):
        return [_launch(mod_name, kname, kernel, args, kwargs)]
    nargs = dict(zip(kernel.fn.arg_names, args))
    configs = kernel.configs
    if kernel.early_config_prune:
        configs = kernel.early_config_prune(configs, nargs, **kwargs)
    return [_launch(mod_name, kname, kernel.fn, args, {**kwargs, **c.all_kwargs()}) for c in configs]


def _record(target, kernels: dict, call):
    """Run `call()` with `target`'s kernels swapped for recorders; {name: [(args, kwargs), ...]}."""
    rec = {n: _Recorder() for n in kernels}
    with mock.patch.multiple(target, **rec):
        call()
    return {n: r.calls for n, r in rec.items()}


def _loss_variant(ln: Launch, dtype: str, d: int) -> str:
    c = ln.constexprs
    parts = [dtype, f"d={d}"]
    if "HAS_GROUPS" in c:
        parts.append("groups" if c["HAS_GROUPS"] else "no-groups")
    if "SYMMETRIC" in c:
        parts.append("sym" if c["SYMMETRIC"] else "asym")
    parts += [f"{n}=1" for n in ln.ones]
    if "FIRST" in c:  # the GEMM step: first (writes the fp32 sum), mid (reads and writes it), last (writes out)
        parts.append({(True, False): "first", (False, False): "mid", (False, True): "last",
                      (True, True): "single"}[(bool(c["FIRST"]), bool(c["LAST"]))])
        parts.append("n-fastest" if c.get("N_FASTEST") else "m-fastest")
    parts.append(f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}")
    return " ".join(parts)


def loss_launches(mod, launcher) -> list[Launch]:
    """Every compilation of the InfoNCE kernels: bf16/fp16/fp32 x d 768/384 x groups x symmetric x autotune
    config. `launcher` is effir.ops.info_nce_triton; the kernels it imported are swapped for recorders while it
    runs."""
    kernels = {n: k for n, k in _kernels(mod).items() if hasattr(launcher, n)}
    out = []
    # in-batch positives plus three hard negatives each: every config is tuned, and dS comes in 1 x 4 blocks of
    # 4096 x 4096, so each GEMM step (first / mid / last for dq, single for ddocs) is compiled
    B, N = 4096, 16384
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for d in (768, 384):
            for groups in (False, True):
                for sym in (False, True):
                    meta = dict(device="meta")
                    q, docs = torch.empty(B, d, dtype=dt, **meta), torch.empty(N, d, dtype=dt, **meta)
                    t = torch.empty((), dtype=torch.float32, **meta)
                    qg = torch.empty(B, dtype=torch.int64, **meta) if groups else None
                    dg = torch.empty(N, dtype=torch.int64, **meta) if groups else None

                    def call():
                        _loss, lse, _dldt = launcher.forward(q, docs, t, qg, dg, 0, sym)
                        launcher.backward(q, docs, t, lse, torch.empty_like(lse), qg, dg, 0)

                    # the Triton GEMM steps (EFFIR_TRITON_LOSS_GEMM=triton; cuBLAS is the default) compiled too
                    with mock.patch.dict(os.environ, EFFIR_TRITON_LOSS_GEMM="triton"):
                        calls = _record(launcher, kernels, call)
                    for kname, kernel in kernels.items():
                        for args, kwargs in calls[kname]:
                            for ln in _expand("info_nce", kname, kernel, args, kwargs):
                                ln.variant = _loss_variant(ln, _TORCH_TO_TRITON[dt], d)
                                ln.family, ln.dtype = "loss", _TORCH_TO_TRITON[dt]
                                out.append(ln)
    return out


def adapter_launches(mod) -> list[Launch]:
    """Every compilation of the adapter kernels: bf16/fp32 x (d, r) x activation x plain/Houlsby/Pfeiffer, and
    fp64 once per layout."""
    kernels = _kernels(mod)
    acts = {v: k for k, v in mod.ACT_IDS.items()}
    out = []
    M = 8192  # tokens per call (e.g. 32 x 256); only its divisibility by 16 reaches the compiler
    shapes = sorted({(d, r) for d in (384, 768, 1024) for r in (d // 16, 48)})
    # fp64 (the exact path: scalars read from an fp64 tensor, fp64 dots) once per layout at d = 768, r = 48
    # "mixed": what bf16 autocast training hands the adapter + LayerNorm op (bf16 h and adapter weights, fp32
    # residual, LayerNorm, dy; Pfeiffer's backward reads the fp32 z), relu only: the activation barely moves registers
    cases = [(dt, d, r, lay, act, False) for dt in (torch.bfloat16, torch.float32, torch.float64)
             for d, r in (shapes if dt != torch.float64 else [(768, 48)]) for lay in _LAYOUTS
             for act in (("relu", "gelu", "silu") if dt != torch.float64 else ("gelu",))]
    cases += [(torch.bfloat16, d, r, lay, "relu", True) for d, r in shapes for lay in _LAYOUTS if lay[2]]
    for dt, d, r, (has_res, pre, post), act, mixed in cases:
        layout = _LAYOUTS[(has_res, pre, post)]
        meta = dict(dtype=dt, device="meta")
        wide = dict(dtype=torch.float32 if mixed else dt, device="meta")
        x = torch.empty(M, d, **(wide if mixed and pre and not has_res else meta))  # Pfeiffer's bwd: fp32 z
        dy = torch.empty(M, d, **wide)
        res = torch.empty(M, d, **wide) if has_res else None
        wd, bd = torch.empty(r, d, **meta), torch.empty(r, **meta)
        wu, bu = torch.empty(d, r, **meta), torch.empty(d, **meta)
        lnw, lnb = (torch.empty(d, **wide), torch.empty(d, **wide)) if post else (None, None)

        def call():
            if has_res and pre:  # Pfeiffer fed h and t: training writes z, inference does not
                mod.fused_adapter_fwd(x, res, wd, bd, wu, bu, lnw, lnb, act, 0.5, 1e-5, pre, post,
                                      z_out=torch.empty_like(res))
                mod.fused_adapter_fwd(x, res, wd, bd, wu, bu, lnw, lnb, act, 0.5, 1e-5, pre, post)
                return
            mod.fused_adapter_fwd(x, res, wd, bd, wu, bu, lnw, lnb, act, 0.5, 1e-5, pre, post)
            mod.fused_adapter_bwd(dy, x, res, wd, bd, wu, bu, lnw, lnb, act, 0.5, 1e-5, pre, post)
            if dt in (torch.float16, torch.bfloat16) and not mixed:  # the knob the GPU bench times beside it
                with mock.patch.dict(os.environ, EFFIR_ADAPTER_A_SCRATCH="0" if pre else "1"):
                    mod.fused_adapter_bwd(dy, x, res, wd, bd, wu, bu, lnw, lnb, act, 0.5, 1e-5, pre, post)

        calls = _record(mod, kernels, call)
        for kname, kernel in kernels.items():
            for args, kwargs in calls[kname]:
                for ln in _expand("bottleneck_adapter", kname, kernel, args, kwargs):
                    c = ln.constexprs
                    act_s = f" {acts[c['ACT']]}" if "ACT" in c else ""
                    lay = (_LAYOUTS[(c["HAS_RES"], c["PRE_LN"], c["POST_LN"])] if "HAS_RES" in c
                           else layout)
                    legacy = " writes z" if c.get("WRITE_Z") else ""
                    # the pre-activation's home where it is not the variant's default (`a_scratch`)
                    lay += ((" mixed" if mixed else "") + ("" if c.get("A_SCRATCH", pre) == pre else
                                                           " a-scratch" if pre is False else " a-registers"))
                    ln.variant = f"{_TORCH_TO_TRITON[dt]} d={d} r={r}{act_s} {lay}{legacy}"
                    ln.family, ln.dtype = "adapter", _TORCH_TO_TRITON[dt]
                    out.append(ln)
    return out


def all_kernel_names() -> set[str]:
    """"<module>.<kernel>" of every `@triton.jit def *_kernel` in kernels/*.py, from the source (no import)."""
    names = set()
    for path in sorted((REPO / "kernels").glob("*.py")):
        names |= {f"{path.stem}.{m}" for m in re.findall(r"^def (\w+_kernel)\(", path.read_text(), flags=re.M)}
    return names


def _sass_counts(cubin: bytes) -> dict:
    """Static counts of tensor-core (HGMMA: wgmma; HMMA: mma.sync) and local-memory (STL/LDL) instructions."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        sass = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", fh.name], check=True,
                              capture_output=True, text=True, timeout=120).stdout
    ops = re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", sass, flags=re.M)
    counts = {op: ops.count(op) for op in ("HGMMA", "HMMA", "STL", "LDL")}
    return {"hgmma": counts["HGMMA"], "hmma": counts["HMMA"], "local_mem_instructions": counts["STL"] + counts["LDL"]}


def _ptxas_stats(log: str) -> dict:
    """Registers, spills and stack from the `ptxas -v` log, plus its performance warnings (e.g. wgmma serialised)."""
    out = {"n_regs": None, "n_spills": None, "spill_loads_bytes": None, "stack_bytes": None}
    if m := re.search(r"Used (\d+) registers", log):
        out["n_regs"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out["stack_bytes"], out["n_spills"], out["spill_loads_bytes"] = map(int, m.groups())
    out["ptxas_notes"] = [ln.strip() for ln in log.splitlines() if "Performance" in ln or "warning" in ln.lower()]
    return out


def _error_text(exc: BaseException) -> str:
    """The exception and its causes (a nested @jit call's CompilationError wraps the real error), last line
    = root cause."""
    parts = []
    while exc is not None and len(parts) < 5:
        parts.append(f"{type(exc).__name__}: {exc}".strip())
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)[-4000:]


def _compile(ln: Launch, fn, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": ln.kernel, "variant": ln.variant, "family": ln.family, "dtype": ln.dtype, "arch": arch,
           "num_warps": ln.options.get("num_warps", 4), "num_stages": ln.options.get("num_stages", 3),
           "constexprs": {k: (v if isinstance(v, (bool, int, float)) else str(v)) for k, v in ln.constexprs.items()},
           "signature": ln.signature, "divisible_by_16": [list(ln.signature)[i] for (i,) in ln.attrs],
           "n_regs": None, "n_spills": None, "spill_loads_bytes": None, "stack_bytes": None, "ptxas_notes": [],
           "shared_bytes": None, "smem_fits": None,
           "hgmma": None, "hmma": None, "local_mem_instructions": None, "compile_s": None, "error": None}
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            c = triton.compile(ASTSource(fn, ln.signature, ln.constexprs, ln.attrs),
                               target=GPUTarget("cuda", arch, 32), options=dict(ln.options))
    except Exception as exc:
        row["compile_s"] = round(time.perf_counter() - t0, 3)
        row["error"] = _error_text(exc)
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 3)
    row.update(_ptxas_stats(log.getvalue()))
    row["shared_bytes"] = c.metadata.shared
    row["smem_fits"] = c.metadata.shared <= SMEM_LIMIT[arch] if arch in SMEM_LIMIT else None
    row.update(_sass_counts(c.asm["cubin"]))
    return row


def compile_all(arch: int, quick: bool, allow_nonconst_globals: bool = False, verbose: bool = False,
                only: set | None = None) -> list[dict]:
    """One result row per kernel variant (see module doc). Launches that compile to the same binary (d only
    reaches the compiler through its divisibility by 16) are compiled once; later rows name it in `same_as`.
    quick: the QUICK subset; only: an explicit set of (kernel, variant) pairs instead.
    allow_nonconst_globals: set TRITON_ALLOW_NON_CONSTEXPR_GLOBALS, to measure kernels that the strict front
    end (the default, as on a GPU) rejects for reading plain Python globals.
    A process that imported Triton under TRITON_INTERPRET=1 (the CPU test session) cannot compile: Triton's own
    @jit library (tl.sum, tl.max, ...) was built for the interpreter. There the work runs in a subprocess."""
    if not _can_compile_here():
        return _compile_all_subprocess(arch, quick, allow_nonconst_globals, only)
    wanted = only if only is not None else (QUICK if quick else None)
    # imported before the env changes: it imports kernels.info_nce, which must keep the caller's mode
    from effir.ops import info_nce_triton

    with _compile_env(allow_nonconst_globals):
        mods = {"info_nce": _fresh_module("info_nce"), "bottleneck_adapter": _fresh_module("bottleneck_adapter")}
        launches = loss_launches(mods["info_nce"], info_nce_triton) + adapter_launches(mods["bottleneck_adapter"])
        seen_rows, done, rows = set(), {}, []
        for ln in launches:
            if (ln.kernel, ln.variant) in seen_rows or (wanted is not None and (ln.kernel, ln.variant) not in wanted):
                continue
            seen_rows.add((ln.kernel, ln.variant))
            if ln.key() in done:
                first = done[ln.key()]
                row = {**first, "variant": ln.variant, "compile_s": 0.0, "same_as": first["variant"]}
            else:
                mod_name, kname = ln.kernel.split(".")
                row = _compile(ln, _jit_fn(getattr(mods[mod_name], kname)), arch)
                done[ln.key()] = row
            rows.append(row)
            if verbose:
                print(_fmt_row(row), flush=True)
    return rows


def _can_compile_here() -> bool:
    """Whether Triton's own @jit library was built for the compiler (Triton imported without the interpreter)."""
    import triton.language.standard as std
    from triton.runtime.jit import JITFunction

    return isinstance(std.cdiv, JITFunction)


def _compile_all_subprocess(arch: int, quick: bool, allow_nonconst_globals: bool, only: set | None) -> list[dict]:
    """compile_all in a fresh interpreter whose env has no TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="triton_aot_") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--arch", str(arch), "--out", str(out)]
        cmd += ["--quick"] if quick else []
        cmd += ["--allow-nonconst-globals"] if allow_nonconst_globals else []
        cmd += ["--only", json.dumps(sorted(only))] if only is not None else []
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
        if not out.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())["rows"]


_COLS = (("kernel", 37), ("variant", 46), ("w/s", 5), ("regs", 5), ("spill", 6), ("smem KB", 8), ("HGMMA", 6),
         ("HMMA", 5), ("LDL/STL", 7), ("s", 5), ("ptxas", 5))


def _fmt_row(r: dict) -> str:
    """One table line: spill = bytes of spill stores, smem '!' = above the arch's shared-memory limit, s '=' =
    same binary as an earlier row, ptxas = codes of its performance warnings (C7513/C7515: wgmma serialised)."""
    if r["error"]:
        cells = [r["kernel"], r["variant"], f"{r['num_warps']}/{r['num_stages']}",
                 "ERROR: " + r["error"].strip().splitlines()[-1][:110]]
        return "  ".join(str(c).ljust(w) for c, (_, w) in zip(cells, _COLS))
    smem = f"{r['shared_bytes'] / 1024:.0f}" + ("" if r["smem_fits"] in (True, None) else "!")
    cells = [r["kernel"], r["variant"], f"{r['num_warps']}/{r['num_stages']}", r["n_regs"], r["n_spills"], smem,
             r["hgmma"], r["hmma"], r["local_mem_instructions"],
             "=" if r.get("same_as") else f"{r['compile_s']:.1f}",
             ",".join(sorted({m for n in r.get("ptxas_notes") or [] for m in re.findall(r"\((C\d+)\)", n)})) or "-"]
    return "  ".join(str(c).ljust(w) for c, (_, w) in zip(cells, _COLS))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 = H100, 80 = A100")
    p.add_argument("--quick", action="store_true", help="a representative subset (QUICK: 12 compilations)")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/triton_aot_sm<arch>.json)")
    p.add_argument("--allow-nonconst-globals", action="store_true",
                   help="set TRITON_ALLOW_NON_CONSTEXPR_GLOBALS (diagnostic: measure kernels that the strict "
                        "front end rejects)")
    p.add_argument("--only", type=json.loads, help=argparse.SUPPRESS)  # JSON [[kernel, variant], ...]
    args = p.parse_args(argv)
    only = {tuple(kv) for kv in args.only} if args.only is not None else None
    if err := toolchain_error():
        print(f"cannot compile for NVIDIA targets here: {err}", file=sys.stderr)
        return 2
    from bench._common import provenance, write_results

    t0 = time.perf_counter()
    print("  ".join(n.ljust(w) for n, w in _COLS), flush=True)
    rows = compile_all(args.arch, args.quick, args.allow_nonconst_globals, verbose=True, only=only)
    wall = time.perf_counter() - t0
    n_err = sum(bool(r["error"]) for r in rows)
    n_bin = sum(not r.get("same_as") for r in rows)
    print(f"\n{len(rows)} variants, {n_bin} distinct compilations, {n_err} variants failed, {wall:.0f} s")
    roots = [r["error"].strip().splitlines()[-1] for r in rows if r["error"]]
    for root in sorted(set(roots)):
        print(f"error ({roots.count(root)} variants): {root}")
    payload = {"arch": args.arch, "quick": args.quick, "allow_nonconst_globals": args.allow_nonconst_globals,
               "autotune_mode": os.environ.get("EFFIR_TRITON_AUTOTUNE", "small"), "wall_s": round(wall, 1),
               "rows": rows}
    if args.out:
        args.out.write_text(json.dumps({"provenance": provenance(), **payload}, indent=2, default=str))
        path = args.out
    else:
        path = write_results(f"triton_aot_sm{args.arch}", payload)
    print("spill: bytes of spill stores; smem '!': above the shared-memory limit; s '=': same binary as an "
          "earlier row; ptxas C7513/C7515: wgmma serialised")
    print(f"wrote {path}")
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
