"""THE prepared GPU script: build, check and time everything in one call on the device machine.

    PYTHONPATH=. python3 bench/gpu_suite.py --out $OUT          # full run, target ~6 min, hard budget 8 min
    PYTHONPATH=. python3 bench/gpu_suite.py --out $OUT --quick  # ~6 min: the issues' target sizes only
    python3 -m bench.gpu_suite --out $OUT                        # same, from the repo root

Sections (each guarded: an error is recorded in the results and the run goes on; each is time-boxed):
 1. provenance: card, driver, torch / triton / CUDA / nvcc versions, commit;
 2. wheels: installs .whl/*.whl (memeff, inf-cl, adapters, ...: see csrc/README.md) into /tmp/site if present;
 3. ceilings: device-to-device copy bytes/s and 8192^3 bf16 matmul FLOP/s (bench/gpu/ceilings.py);
 4. JIT build of the CUDA extension (csrc_build.jit_kwargs, sm_90a only here), started first in a background
    process so that it compiles while sections 3 and 5 use the GPU;
 5. bench.gpu.loss / bench.gpu.adapter / bench.gpu.ncu / bench.gpu.grad_cache / bench.gpu.encoder
    `.run(out, quick)` (other issues' sections, import-guarded: a missing module is recorded, not fatal; ncu:
    Nsight Compute counters of the fused kernels at the target sizes; grad_cache: GradCache's CUDA RNG replay and
    gradients, and a train step's time and memory with and without it);
 6. bench/gpu/cuda_ext.py: float64-reference checks of backend="cuda" (and "triton", same rule), cuda vs triton
    timings, SASS evidence (HGMMA / HMMA counts).
Results: $OUT/suite.json (rewritten after every section), $OUT/cuda_ext.json, $OUT/build.log, plus whatever the
other sections write (each at most one file; 8 files in all come back). A short table is printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

T_START = time.time()


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise SectionTimeout in the main thread after `seconds` (checked between Python bytecodes)."""
    def _raise(signum, frame):
        raise SectionTimeout(f"section exceeded its {seconds:.0f} s time box")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def write_json(path: Path, payload) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def log(msg: str) -> None:
    print(f"[gpu_suite {time.time() - T_START:6.1f}s] {msg}", flush=True)


def install_wheels() -> dict:
    """pip-install carried wheels (.whl/*.whl) into /tmp/site and put it on sys.path (no network there)."""
    wheels = sorted(glob.glob(str(REPO / ".whl" / "*.whl")))
    if not wheels:
        return {"wheels": [], "note": "no .whl/ folder: peers not installed (see csrc/README.md for the command)"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", "/tmp/site", *wheels]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if p.returncode == 0:
        sys.path.insert(0, "/tmp/site")
        os.environ["PYTHONPATH"] = "/tmp/site" + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {"wheels": [Path(w).name for w in wheels], "rc": p.returncode, "stderr": p.stderr[-2000:]}


def cuda_include_env() -> None:
    """Append torch's pip CUDA headers (site-packages/nvidia/cu13/include: cuBLAS & co.) to CPATH.

    CUDA_HOME's own include directory comes first on nvcc's command line, so these only fill in headers the
    toolkit lacks (as on the CPU machines here, where /usr/local/cuda has no cuBLAS headers).
    """
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return
    site = Path(spec.origin).resolve().parent.parent
    extra = [str(p) for p in (site / "nvidia" / "cu13" / "include", site / "nvidia" / "cu12" / "include") if p.is_dir()]
    old = os.environ.get("CPATH", "")
    os.environ["CPATH"] = os.pathsep.join([*([old] if old else []), *extra])
    if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def start_jit_build(out: Path, build_dir: Path) -> subprocess.Popen:
    """Compile the extension in a background process (ninja, all cores) while the GPU does other sections."""
    build_dir.mkdir(parents=True, exist_ok=True)
    cuda_include_env()
    code = (
        "import sys, time; sys.path.insert(0, %r); import csrc_build as cb; "
        "from torch.utils.cpp_extension import load; t = time.time(); "
        "m = load(**cb.jit_kwargs(build_directory=%r, verbose=True)); "
        "print('JIT_BUILD_OK', round(time.time() - t, 1), m.__file__, flush=True)"
    ) % (str(REPO), str(build_dir))
    env = dict(os.environ, EFFIR_CUDA_GENCODE=os.environ.get("EFFIR_CUDA_GENCODE", "90a"),
               MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 8)))
    fh = open(out / "build.log", "w")
    return subprocess.Popen([sys.executable, "-c", code], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def finish_jit_build(proc: subprocess.Popen, out: Path, build_dir: Path, timeout: float) -> dict:
    """Wait for the build, then load the module in this process and register it as `effir._C`."""
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"ok": False, "error": f"JIT build still running after its {timeout:.0f} s budget (killed)"}
    text = (out / "build.log").read_text(errors="replace")
    info = {"rc": rc, "log_tail": text[-3000:],
            "spills": sorted({ln.strip()[:300] for ln in text.splitlines() if "Registers are spilled" in ln})}
    if rc != 0 or "JIT_BUILD_OK" not in text:
        return {"ok": False, **info}
    import csrc_build as cb
    from torch.utils.cpp_extension import load

    env_old = os.environ.get("EFFIR_CUDA_GENCODE")
    os.environ["EFFIR_CUDA_GENCODE"] = env_old or "90a"  # same flags as the build: ninja finds it up to date
    t = time.time()
    mod = load(**cb.jit_kwargs(build_directory=str(build_dir)))
    sys.modules["effir._C"] = mod  # what effir.backends / effir.ops._cuda_ext import
    import effir.backends as eb

    eb.cuda_extension_error.cache_clear()
    info.update(ok=eb.cuda_extension_error() is None, so=mod.__file__, load_s=round(time.time() - t, 1),
                build_s=next((ln.split()[1] for ln in text.splitlines() if ln.startswith("JIT_BUILD_OK")), None))
    return info


def call_other(modname: str, out: Path, quick: bool, budget_s: float) -> dict:
    """Another issue's section: `run(out, quick[, budget_s])`, which writes at most one file under out."""
    import importlib
    import inspect

    try:
        mod = importlib.import_module(modname)
    except Exception as exc:
        return {"skipped": f"import {modname} failed: {type(exc).__name__}: {exc}"}
    kw = {"budget_s": budget_s} if "budget_s" in inspect.signature(mod.run).parameters else {}
    return {"result": mod.run(out, quick, **kw)}


def summary_rows(results: dict) -> list[str]:
    rows = []
    for name, sec in results.get("sections", {}).items():
        status = "ok" if not sec.get("error") and not sec.get("skipped") else (
            "SKIP " + str(sec.get("skipped"))[:60] if sec.get("skipped") else "ERR " + str(sec.get("error"))[:60])
        rows.append(f"{name:22s} {sec.get('seconds', 0):6.1f}s  {status}")
    ce = results.get("cuda_ext") or {}
    for key in ("loss_correctness", "adapter_correctness", "loss_correctness_triton", "adapter_correctness_triton"):
        v = ce.get(key)
        if isinstance(v, list):
            for be in ("cuda", "triton"):
                sel = [c for c in v if c.get("backend") == be and not c.get("skipped")]
                if not sel:
                    continue
                bad = [c for c in sel if not c.get("ok")]
                skipped = sum(1 for c in v if c.get("backend") == be and c.get("skipped"))
                rows.append(f"{key[:22]:22s} {be:7s} {len(sel) - len(bad)}/{len(sel)} pass"
                            + (f" ({skipped} skipped: time)" if skipped else "")
                            + (f"  first fail: {_case_str(bad[0])}" if bad else ""))
        elif isinstance(v, dict):
            rows.append(f"{key[:22]:22s} {str(v.get('error') or v.get('skipped'))[:90]}")
    for key, unit in (("loss_timing", "tflops"), ("adapter_timing", "gbytes_per_s")):
        v = ce.get(key)
        if isinstance(v, list):
            by = {}
            for c in v:
                k = tuple((c.get(x)) for x in ("B", "M", "d", "variant"))
                by.setdefault(k, {})[c.get("backend")] = c
            for k, pair in by.items():
                cu, tr = pair.get("cuda", {}), pair.get("triton", {})
                ratio = (cu["fwd_bwd_ms"] / tr["fwd_bwd_ms"]) if "fwd_bwd_ms" in cu and "fwd_bwd_ms" in tr else None
                desc = ",".join(str(x) for x in k if x is not None)
                rows.append(f"{key:15s} {desc:18s} cuda {cu.get('fwd_bwd_ms', cu.get('error', cu.get('skipped')))!s:.10} ms"
                            f" triton {tr.get('fwd_bwd_ms', tr.get('error', tr.get('skipped')))!s:.10} ms"
                            f" cuda/triton {ratio if ratio is None else round(ratio, 2)}"
                            f" cuda {unit} {round(cu.get(unit, 0), 1)}")
    sass = ce.get("sass") or {}
    if "totals" in sass:
        rows.append(f"SASS totals            {sass['totals']}")
    ceil = (results.get("ceilings") or {})
    if "copy" in ceil:
        rows.append(f"ceilings               copy {ceil['copy']['bytes_per_s'] / 1e12:.2f} TB/s, "
                    f"bf16 matmul {ceil['matmul_bf16']['flop_per_s'] / 1e12:.0f} TFLOP/s")
    return rows


def _case_str(c: dict) -> str:
    keys = ("dtype", "B", "M", "d", "r", "symmetric", "groups", "variant", "activation")
    s = " ".join(f"{k}={c[k]}" for k in keys if k in c)
    if "error" in c:
        return s + " " + c["error"][:80]
    worst = max(c.get("checks", []), key=lambda x: x["err"] / max(x["bound"], 1e-30), default=None)
    return s + (f" {worst['name']} err {worst['err']:.2e} > {worst['bound']:.2e}" if worst else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", str(REPO / "bench" / "results" / "gpu_suite")))
    ap.add_argument("--quick", action="store_true", help="~6 minute run: the issues' target sizes only")
    ap.add_argument("--budget", type=float, default=None, help="total seconds (default 480, quick 340)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: "
                    "wheels,ceilings,loss,adapter,ncu,grad_cache,encoder,jit_build,cuda_ext")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (340.0 if args.quick else 480.0)
    deadline = T_START + budget
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = {"argv": sys.argv, "quick": args.quick, "budget_s": budget, "sections": {}}
    suite_json = out / "suite.json"

    def section(name: str, box: float, fn):
        left = deadline - time.time()
        if name in skip:
            results["sections"][name] = {"skipped": "--skip"}
        elif left < 5:
            results["sections"][name] = {"skipped": "time budget exhausted"}
        else:
            t0 = time.time()
            log(f"{name} (time box {min(box, left):.0f} s)")
            try:
                with time_box(min(box, left)):
                    value = fn()
                results[name] = value
                results["sections"][name] = {"seconds": round(time.time() - t0, 1)}
            except BaseException as exc:  # SectionTimeout, CUDA errors, ImportError: recorded, never fatal
                if isinstance(exc, KeyboardInterrupt):
                    raise
                results["sections"][name] = {"seconds": round(time.time() - t0, 1),
                                             "error": f"{type(exc).__name__}: {exc}",
                                             "trace": traceback.format_exc()[-3000:]}
                log(f"{name} failed: {type(exc).__name__}: {exc}")
        write_json(suite_json, results)

    # 1. provenance (also nvcc and nvidia-smi, which the build and the numbers depend on)
    def provenance():
        from bench._common import provenance as prov

        info = prov()
        for cmd in (["nvcc", "--version"], ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,"
                                            "power.limit,temperature.gpu", "--format=csv"]):
            try:
                info[cmd[0]] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()[-600:]
            except Exception as exc:
                info[cmd[0]] = f"unavailable: {exc}"
        return info

    # The compile goes first: it takes the longest (~1-2 min on 16 cores) and needs no GPU.
    build_dir = Path("/tmp/effir_jit")
    proc = None
    if "cuda_ext" not in skip:
        try:
            proc = start_jit_build(out, build_dir)
            log("JIT build of the CUDA extension started in the background (build.log)")
        except Exception as exc:
            results["sections"]["jit_build_start"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        return _run_sections(args, out, deadline, skip, results, suite_json, section, provenance, proc, build_dir)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()


def _run_sections(args, out, deadline, skip, results, suite_json, section, provenance, proc, build_dir) -> int:
    section("provenance", 30, provenance)
    section("wheels", 120, install_wheels)

    import torch

    if not torch.cuda.is_available():
        results["sections"]["cuda"] = {"error": "no CUDA device visible to torch"}
        write_json(suite_json, results)
        print("\n".join(summary_rows(results)))
        return 1

    from bench.gpu import ceilings

    section("ceilings", 40, lambda: ceilings.run(out, args.quick))
    q = args.quick
    # quick boxes: a fresh machine compiles every Triton variant first (the loss kernels take ~30 s of them)
    for name, box in (("loss", 130 if q else 150), ("adapter", 240 if q else 150), ("ncu", 60 if q else 90),
                      ("grad_cache", 60), ("encoder", 15 if q else 60)):
        # each section starts with the cache released (ncu: a child process profiles and needs the memory; run 4's
        # grad_cache section ran out of memory after the adapter section's failed graph captures)
        torch.cuda.empty_cache()
        section(name, box, lambda name=name, box=box: call_other(f"bench.gpu.{name}", out, q, box - 10))

    def build():
        if proc is None:
            raise RuntimeError("JIT build was not started")
        info = finish_jit_build(proc, out, build_dir, timeout=max(5.0, deadline - time.time() - 60))
        if not info.get("ok"):
            raise RuntimeError(f"CUDA extension unavailable: {info.get('error') or info.get('log_tail', '')[-800:]}")
        return info

    section("jit_build", 400, build)

    def cuda_ext():
        if "jit_build" not in results:
            raise RuntimeError("skipped: the JIT build failed (see sections.jit_build)")
        from bench.gpu import cuda_ext as ce

        res = ce.run(out, q, deadline - 15, results["jit_build"].get("so"))
        write_json(out / "cuda_ext.json", res)
        return res

    section("cuda_ext", 300, cuda_ext)
    results["total_s"] = round(time.time() - T_START, 1)
    write_json(suite_json, results)
    print("\n==== gpu_suite summary ====")
    for row in summary_rows(results):
        print(row)
    print(f"total {results['total_s']} s; files in {out}: {sorted(p.name for p in out.iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
