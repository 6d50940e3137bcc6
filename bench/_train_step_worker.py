"""One train step, timed and measured in a fresh process: effir's or the peers' (ST MNRL + AdapterHub).

Run by bench/bench_train.py (never by pytest directly), one process per implementation, so each process's
peak resident memory belongs to one implementation only:

    python bench/_train_step_worker.py --impl effir|peers --batch BATCH.pt --model-dir DIR --out RESULT.json

BATCH.pt holds the tokenized batch (same token ids for both sides: E5 "query: " / "passage: " prefixes,
effir's tokenizer). DIR is the encoder (multilingual-e5-small, 4-bit weights, dequantized to fp32) as a
Hugging Face BERT folder, loaded by both sides. The step: encode queries, encode passages (shared
weights), in-batch InfoNCE at temperature 0.05 (= MNRL scale 20, cosine), backward, AdamW step.
- effir: `effir.add_adapters(seq_bn)` (fused adapter op) + `effir.InfoNCELoss` (fused loss) + the unpadded
  encoder forward (`Encoder(unpad=True)`, the default), the module
  `effir.training.loop.DualEncoderLoss` that `python -m effir.train` runs.
- peers: sentence-transformers Transformer + mean Pooling + Normalize, AdapterHub `seq_bn` adapter
  (`adapters.init`, `train_adapter`), `MultipleNegativesRankingLoss`.
The peers side needs .venv-peers (adapters pins transformers 4.57); PYTHONPATH makes bench/ importable.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import PeakMemory  # noqa: E402


def build_effir(model_dir: str, reduction_factor: float, loss_backend: str, device: torch.device):
    from effir import InfoNCELoss, add_adapters, load_encoder
    from effir.training.loop import DualEncoderLoss

    encoder = load_encoder(model_dir, pooling="mean", device=device)
    add_adapters(encoder.model, config="seq_bn", reduction_factor=reduction_factor)
    loss = InfoNCELoss(temperature=0.05, backend=loss_backend)
    module = DualEncoderLoss(encoder, loss, "fp32", device)

    def step_loss(q, p, groups):
        return module(q, p, groups)

    return module, step_loss


def build_peers(model_dir: str, reduction_factor: float, device: torch.device):
    import adapters
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.models import Normalize, Pooling, Transformer

    tr = Transformer(model_dir, max_seq_length=512)
    st = SentenceTransformer(modules=[tr, Pooling(tr.get_word_embedding_dimension(), "mean"), Normalize()],
                             device=str(device))
    hf = tr.auto_model
    adapters.init(hf)
    hf.add_adapter("bench", config=adapters.SeqBnConfig(reduction_factor=reduction_factor))
    hf.train_adapter("bench")  # freezes the backbone, adapter trainable
    # Start from the identity like effir's adapters (zero up-projection), so both sides' first losses agree
    # and check that the two steps compute the same thing; the init does not change the cost.
    with torch.no_grad():
        for name, prm in hf.named_parameters():
            if "adapter_up" in name:
                prm.zero_()
    st.to(device)
    loss = MultipleNegativesRankingLoss(st, scale=20.0)  # scale 20 = temperature 0.05, cosine similarity

    def step_loss(q, p, groups):
        return loss([q, p], labels=None)

    return st, step_loss


def torch_peak_bytes(fn) -> tuple[int, object]:
    """Peak of live torch CPU allocations while `fn()` runs, above the level when it starts (bytes), and fn's result.

    Deterministic (unlike the resident set): torch.profiler(profile_memory=True) records one "[memory]" event
    per allocation (+bytes) and per free (-bytes) made through torch's allocator; sorted by time, the
    running sum is the live bytes allocated since the start, and its maximum is the step's peak. Frees of
    blocks allocated before the start count negative, so the peak is taken above the start level (0).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        result = fn()
    # The raw kineto events (prof.events() folds allocations into their ops); stable sort by start time.
    events = [(e.start_ns(), i, int(e.nbytes())) for i, e in enumerate(prof.profiler.kineto_results.events())
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort()
    live = peak = 0
    for _, _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result


def _pin_malloc() -> None:
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to pin
        return
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.malloc_trim(0)


class _NvmlSampler:
    """GPU utilisation, memory and power, sampled every 10 ms by a thread while the timed steps run."""

    def __init__(self, device: torch.device):
        import threading

        import pynvml

        pynvml.nvmlInit()
        self.nv = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        nv, h = self.nv, self.handle
        while not self._stop.is_set():
            util = nv.nvmlDeviceGetUtilizationRates(h).gpu
            mem = nv.nvmlDeviceGetMemoryInfo(h).used
            power = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
            self.samples.append((util, mem, power))
            self._stop.wait(0.01)

    def start(self):
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        if not self.samples:
            return {}
        util, mem, power = zip(*self.samples)
        return {"gpu_util_percent": statistics.mean(util), "gpu_memory_bytes": max(mem),
                "gpu_power_w": statistics.mean(power), "nvml_samples": len(self.samples)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=("effir", "peers"), required=True)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reduction-factor", type=float, default=16)
    ap.add_argument("--loss-backend", default="auto")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--memory-only", action="store_true", help="skip the timed steps")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    batch = torch.load(args.batch, weights_only=False)
    q = {k: v.to(device) for k, v in batch["q"].items()}
    p = {k: v.to(device) for k, v in batch["p"].items()}
    groups = batch["groups"].to(device)
    if args.impl == "effir":
        module, step_loss = build_effir(args.model_dir, args.reduction_factor, args.loss_backend, device)
    else:
        module, step_loss = build_peers(args.model_dir, args.reduction_factor, device)
    module.train()
    params = [p_ for p_ in module.parameters() if p_.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    def step():
        loss = step_loss(q, p, groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return float(loss.detach())

    # FLOPs of one step (matmul-class ops as torch's FlopCounterMode counts them).
    from torch.utils.flop_counter import FlopCounterMode

    from bench._flops import register_effir_flop_formulas

    register_effir_flop_formulas()  # effir's custom ops and CPU sdpa get formulas (see bench/_flops.py)
    # Dropout off for this one step (eval mode changes no matmul): both sides then compute the same loss
    # from the same weights and tokens, which checks that the two steps do the same thing.
    module.eval()
    with FlopCounterMode(display=False) as fc:
        first_loss = step()
    module.train()
    flops = fc.get_total_flops()
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    for _ in range(args.warmup):
        step()
    times = []
    nvml = _NvmlSampler(device) if device.type == "cuda" else None
    if nvml is not None:
        nvml.start()
    for _ in range(0 if args.memory_only else args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    gpu = nvml.stop() if nvml is not None else {}
    # Peak memory of one step above the state before it (weights, optimizer state already allocated).
    # On CPU, glibc keeps freed blocks in its heap once its mmap threshold has grown, so the resident set
    # would no longer follow torch's allocations: pin the threshold (every block >= 64 KiB is its own
    # mapping, given back on free), hand the heap back, and take one untimed step to settle.
    if device.type == "cpu":
        _pin_malloc()
        step()
    with PeakMemory(device) as pm:  # resident set (VmHWM) above the start: informational, noisy on CPU
        step()
    # The figure compared: peak live torch allocations of one step (forward, backward, AdamW), exact.
    torch_peak, _ = torch_peak_bytes(step) if device.type == "cpu" else (None, None)
    import transformers
    tokens = int(q["attention_mask"].sum() + p["attention_mask"].sum())
    padded = int(q["attention_mask"].numel() + p["attention_mask"].numel())
    B = int(q["input_ids"].shape[0])
    med = statistics.median(times) if times else float("nan")
    out = {
        "impl": args.impl,
        "batch_size": B,
        "query_tokens_padded": list(q["input_ids"].shape),
        "passage_tokens_padded": list(p["input_ids"].shape),
        "tokens": tokens,
        "query_tokens": int(q["attention_mask"].sum()),
        "passage_tokens": int(p["attention_mask"].sum()),
        "padded_tokens": padded,
        "step_s_median": med,
        "step_s_all": times,
        "examples_per_s": B / med,
        "tokens_per_s": tokens / med,
        "peak_memory_bytes": torch_peak if torch_peak is not None else pm.peak,
        "peak_torch_cpu_bytes": torch_peak,
        "peak_rss_bytes": pm.peak,
        "flops_per_step": flops,
        "flops_by_op": by_op,
        "first_loss": first_loss,
        "trainable_parameters": sum(x.numel() for x in params),
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
        "device": str(device),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python": sys.executable,
        **gpu,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
