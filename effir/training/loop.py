"""The training loop: hybrid batches -> dual encoder (shared weights) -> InfoNCE with group masking.

One optimizer step per sampler batch. Under torchrun every rank encodes its slice of the global batch
and the loss gathers the passages of all ranks (`InfoNCELoss(gather=True)`), so each query sees the whole
global batch as negatives; DDP averages the trainable gradients (adapters, or the whole model).
With `--mini-batch-size N` the step runs as GradCache (`effir/grad_cache.py`): the encoder works through N texts at
a time, so activation memory no longer grows with the batch; the gradients are the whole batch's, averaged
over ranks by one all-reduce after the step's backward (no DDP wrapper: its hooks expect one backward per
forward).

Exactness of `--resume`: the checkpoint carries the sampler position, optimizer, scheduler, GradScaler and
every RNG; the loop restores them right before the first step, after anything (evaluation) that could
draw random numbers, so a resumed run produces the same losses as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from effir import grad_cache
from effir.data.batching import HardNegatives

from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import RunContext, all_reduce_sum
from .metrics_log import JsonlLog


# ---------------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> bf16 on a GPU that supports it, fp32 on CPU (bf16 autocast on CPU is correct but is
    only faster on CPUs with native bf16 matmuls; choose it explicitly with --precision bf16)."""
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("--precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    """torch.autocast for bf16/fp16 (weights stay fp32; matmuls run in the low precision)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device):
    """A GradScaler only for fp16 (bf16 has fp32's exponent range and needs no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))


# ---------------------------------------------------------------------------------------------------
# optimizer and schedule
# ---------------------------------------------------------------------------------------------------
def param_groups(named_params, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, LayerNorm weights and the temperature (standard BERT recipe)."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear 0 -> 1 over `warmup_steps`, then linear 1 -> 0 at `total_steps`."""
    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        remaining = max(total_steps - step, 0)
        return remaining / max(total_steps - warmup_steps, 1)

    return fn


# ---------------------------------------------------------------------------------------------------
# the model DDP wraps: encoder + loss, so a learnable temperature is averaged like every other parameter
# ---------------------------------------------------------------------------------------------------
class DualEncoderLoss(torch.nn.Module):
    """Shared-weight dual encoder plus InfoNCE. forward(q_inputs, p_inputs, groups) -> scalar loss (fp32).

    q_inputs / p_inputs: dicts of (B_local, T) int64 tensors from `Encoder.tokenize`; groups: (B_local,)
    int64 group ids (the i-th query and i-th passage share group groups[i]). The embeddings are (B_local, H)
    L2-normalised, so the dot products the loss takes are cosine similarities.
    """

    def __init__(self, encoder: torch.nn.Module, loss: torch.nn.Module, precision: str, device: torch.device):
        super().__init__()
        self.encoder = encoder
        self.loss = loss
        self.precision = precision
        self.device_type = device

    def forward(self, q_inputs: dict, p_inputs: dict, groups: torch.Tensor, n_inputs: dict | None = None,
                n_groups: torch.Tensor | None = None) -> torch.Tensor:
        """n_inputs / n_groups (optional): hard-negative passages (M_local, T) and their (M_local,) group ids."""
        with autocast_context(self.precision, self.device_type):
            q = self.encoder(**q_inputs)
            p = self.encoder(**p_inputs)
            n = self.encoder(**n_inputs) if n_inputs is not None else None
        # The fused loss accumulates in fp32 whatever the embeddings' dtype; masking translations of the
        # same group keeps parallel items out of each other's negatives.
        doc_groups = groups if n is None else torch.cat([groups, n_groups])
        return self.loss(q, p, n, query_groups=groups, doc_groups=doc_groups)


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    examples: int
    tokens: int
    seconds: float
    temperature: float | None = None
    q_shape: tuple[int, int] = (0, 0)  # this rank's padded (batch, tokens): FLOP counts need padded sizes
    p_shape: tuple[int, int] = (0, 0)
    q_tokens: int = 0  # this rank's real (unpadded) tokens: what the unpadded encoder computes on
    p_tokens: int = 0


@dataclass
class TrainResult:
    steps_done: int
    total_steps: int
    interrupted: bool
    records: list[StepRecord] = field(default_factory=list)
    wall_s: float = 0.0
    examples: int = 0
    tokens: int = 0
    peak_memory_bytes: int | None = None
    peak_memory_added_bytes: int | None = None

    def summary(self) -> dict:
        return {
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_added_bytes": self.peak_memory_added_bytes,
            "steps_done": self.steps_done,
            "total_steps": self.total_steps,
            "interrupted": self.interrupted,
            "train_wall_s": round(self.wall_s, 3),
            "examples": self.examples,
            "tokens": self.tokens,
            "examples_per_s": self.examples / self.wall_s if self.wall_s > 0 else None,
            "tokens_per_s": self.tokens / self.wall_s if self.wall_s > 0 else None,
            "final_loss": self.records[-1].loss if self.records else None,
            "mean_loss_last_10": (sum(r.loss for r in self.records[-10:]) / len(self.records[-10:]))
            if self.records else None,
        }


class _PeakMemory:
    """Peak memory of the training loop. CUDA: the allocator's peak; CPU (Linux): the resident-set
    high-water mark (VmHWM, reset through /proc/self/clear_refs), i.e. the process peak including weights.
    `peak` is that peak, `added` the part above the memory in use when the loop started; both None where
    they cannot be read."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.added, self._base = device, None, None, None

    @staticmethod
    def _status(field: str):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return None

    def __enter__(self):
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                self._base = torch.cuda.memory_allocated(self.device)
            else:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
                self._base = self._status("VmRSS")
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        try:
            self.peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                         else self._status("VmHWM"))
        except OSError:
            self.peak = None
        if self.peak is not None and self._base is not None:
            self.added = self.peak - self._base
        return False


class _SigintFlag:
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: stop at once.

    Under torchrun SIGTERM is handled the same way: on Ctrl-C the torchrun agent terminates its workers
    with SIGTERM (and SIGKILL 30 s later), so a worker must treat it as a request to checkpoint and stop.
    """

    def __init__(self, distributed: bool = False):
        self.set = False
        self._signals = (signal.SIGINT, signal.SIGTERM) if distributed else (signal.SIGINT,)
        self._old: dict = {}

    def __enter__(self):
        for sig in self._signals:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a test runner thread): leave it alone
                pass
        return self

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class Trainer:
    """Owns the optimisation state of one run. Build it, optionally `restore()`, then `train()`.

    encoder: an `effir.Encoder` on `ctx.device` (adapters already added, when training adapters);
    groups: the training ParallelGroups; sampler: a HybridBatchSampler for this rank (its batch_size is
    the global batch); collate: `effir.data.batching.collate`.
    """

    def __init__(self, cfg: TrainConfig, encoder, groups, sampler, collate, ctx: RunContext,
                 output_dir, log: JsonlLog, total_steps: int):
        from effir import InfoNCELoss

        self.cfg, self.ctx, self.groups, self.sampler, self.collate = cfg, ctx, groups, sampler, collate
        self.encoder = encoder
        self.output_dir = output_dir
        self.log = log
        self.total_steps = int(total_steps)
        self.precision = resolve_precision(cfg.precision, ctx.device)
        loss = InfoNCELoss(
            temperature=cfg.temperature,
            learnable_temperature=cfg.learnable_temperature,
            backend=cfg.loss_backend,
            gather=ctx.distributed,
        ).to(ctx.device)
        self.module = DualEncoderLoss(encoder, loss, self.precision, ctx.device)
        if ctx.distributed and cfg.mini_batch_size:
            self.model = self.module
            for p in self.module.parameters():  # what DDP's constructor does: every rank starts from rank 0's
                if p.requires_grad:
                    dist.broadcast(p.data, 0)
        elif ctx.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        else:
            self.model = self.module
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("nothing to train: the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            param_groups(self.module.named_parameters(), cfg.weight_decay), lr=cfg.resolved_lr(),
        )
        warm = cfg.warmup_steps(self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_warmup_decay(warm, self.total_steps))
        self.scaler = make_grad_scaler(self.precision, ctx.device)
        self.hard_negatives = HardNegatives(groups, cfg.hard_negatives) if cfg.hard_negatives else None
        self.step = 0
        self._rng_to_restore = None
        self._sampler_iter = None

    # ---- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "weights": ckpt.trainable_state_dict(self.encoder, only_trainable=self.cfg.train_adapters),
            "loss": {k: v.detach().cpu() for k, v in self.module.loss.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "config": self.cfg.to_dict(),
        }

    def save(self, reason: str) -> None:
        """Gather every rank's RNG state and let rank 0 write the checkpoint atomically."""
        rng = ckpt.rng_state()
        if self.ctx.distributed:
            states = [None] * self.ctx.world_size
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        if self.ctx.is_main:
            path = ckpt.save_checkpoint(self.output_dir, {**self.state_dict(), "rng": states})
            self.log.write("checkpoint", step=self.step, reason=reason, path=str(path))
        if self.ctx.distributed:
            dist.barrier()

    def restore(self, state: dict) -> None:
        ckpt.load_trainable_state_dict(self.encoder, state["weights"], only_trainable=self.cfg.train_adapters)
        self.module.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        rngs = state["rng"]
        if len(rngs) != self.ctx.world_size:
            raise ValueError(f"--resume: the checkpoint was written by {len(rngs)} processes, this run has "
                             f"{self.ctx.world_size}; resume with the same --nproc-per-node")
        # Restored right before the first step (see the module docstring).
        self._rng_to_restore = rngs[self.ctx.rank]

    # ---- one step -------------------------------------------------------------------------------------
    def _next_batch(self):
        if self._sampler_iter is None:
            self._sampler_iter = iter(self.sampler)
        try:
            return next(self._sampler_iter)
        except StopIteration:  # an epoch ended: the sampler starts its next epoch
            self._sampler_iter = iter(self.sampler)
            return next(self._sampler_iter)

    def _tokenize(self, queries, passages, group_ids):
        enc = self.encoder
        dev = self.ctx.device
        q = enc.tokenize(queries, kind="query", max_length=self.cfg.max_query_length)
        p = enc.tokenize(passages, kind="passage", max_length=self.cfg.max_passage_length)
        q = {k: v.to(dev, non_blocking=True) for k, v in q.items()}
        p = {k: v.to(dev, non_blocking=True) for k, v in p.items()}
        groups = torch.as_tensor(group_ids, dtype=torch.int64).to(dev)
        return q, p, groups, (int(q["attention_mask"].sum()), int(p["attention_mask"].sum()))

    def _negatives(self, batch):
        """(tokenized hard negatives, their group ids, their token count), or (None, None, 0)."""
        if self.hard_negatives is None:
            return None, None, 0
        texts, ids = self.hard_negatives(batch)
        n = self.encoder.tokenize(texts, kind="passage", max_length=self.cfg.max_passage_length)
        n = {k: v.to(self.ctx.device, non_blocking=True) for k, v in n.items()}
        return n, ids.to(self.ctx.device), int(n["attention_mask"].sum())

    def train_step(self) -> StepRecord:
        t0 = time.perf_counter()
        batch = self._next_batch()
        queries, passages, group_ids = self.collate(self.groups, batch)
        q, p, groups, (q_tokens, p_tokens) = self._tokenize(queries, passages, group_ids)
        n, n_groups, n_tokens = self._negatives(batch)
        tokens = q_tokens + p_tokens + n_tokens
        self.model.train()
        if self.cfg.mini_batch_size:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._grad_cache_backward(q, p, groups, n, n_groups)
        else:
            loss = self.model(q, p, groups, n, n_groups)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        if self.cfg.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        # The logged loss is the global-batch mean: every rank's local mean, averaged over ranks.
        loss_sum, n_examples, n_tokens = all_reduce_sum(self.ctx, [float(loss.detach()), len(queries), tokens])
        temp = getattr(self.module.loss, "temperature", None)
        temp = float(temp.detach()) if isinstance(temp, torch.Tensor) else temp
        return StepRecord(self.step, loss_sum / self.ctx.world_size, lr, int(n_examples), int(n_tokens),
                          time.perf_counter() - t0, temp, tuple(q["input_ids"].shape), tuple(p["input_ids"].shape),
                          q_tokens, p_tokens)

    def _grad_cache_backward(self, q: dict, p: dict, groups: torch.Tensor, n: dict | None = None,
                             n_groups: torch.Tensor | None = None) -> torch.Tensor:
        """The step's loss and backward as GradCache: embeddings without autograd in chunks of
        --mini-batch-size texts, the loss's gradient with respect to them, then each chunk re-embedded (same
        RNG) and backpropagated. Gradients end up as the whole-batch step's (averaged over ranks)."""
        m, dev = self.module, self.ctx.device
        loss = grad_cache.dual_encoder_backward(m.encoder, m.loss, q, p, groups, self.cfg.mini_batch_size, dev,
                                                negatives=n, negative_groups=n_groups,
                                                autocast=lambda: autocast_context(self.precision, dev),
                                                scale=self.scaler.scale)
        if self.ctx.distributed:
            self._average_grads()
        return loss

    def _average_grads(self) -> None:
        """DDP's gradient average, as one all-reduce of the flattened trainable gradients."""
        for p in self.trainable:
            if p.grad is None:  # every rank must reduce the same shapes
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.trainable]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.ctx.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---- the loop -------------------------------------------------------------------------------------
    def train(self, on_step: Callable[[StepRecord], None] | None = None) -> TrainResult:
        from .progress import Progress

        result = TrainResult(steps_done=self.step, total_steps=self.total_steps, interrupted=False)
        if self._rng_to_restore is not None:
            ckpt.set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self.log.write("train_start", step=self.step, total_steps=self.total_steps, precision=self.precision,
                       world_size=self.ctx.world_size, lr=self.cfg.resolved_lr())
        start = time.perf_counter()
        mem = _PeakMemory(self.ctx.device)
        with mem, _SigintFlag(self.ctx.distributed) as sigint, Progress(self.total_steps, self.step, enabled=self.cfg.progress
                                               and self.ctx.is_main) as bar:
            while self.step < self.total_steps:
                rec = self.train_step()
                if not math.isfinite(rec.loss):
                    raise FloatingPointError(f"loss is {rec.loss} at step {rec.step}; lower --lr or use fp32")
                result.records.append(rec)
                result.examples += rec.examples
                result.tokens += rec.tokens
                elapsed = time.perf_counter() - start
                bar.update(rec, result.examples / elapsed, result.tokens / elapsed)
                if self.cfg.log_every and (rec.step % self.cfg.log_every == 0 or rec.step == self.total_steps):
                    self.log.write("step", step=rec.step, loss=rec.loss, lr=rec.lr, examples=rec.examples,
                                   tokens=rec.tokens, step_s=round(rec.seconds, 4), temperature=rec.temperature,
                                   q_shape=list(rec.q_shape), p_shape=list(rec.p_shape),
                                   q_tokens=rec.q_tokens, p_tokens=rec.p_tokens,
                                   examples_per_s=result.examples / elapsed, tokens_per_s=result.tokens / elapsed)
                if on_step is not None:
                    on_step(rec)
                # Every rank must agree to stop (a Ctrl-C may reach only some of them).
                stop = all_reduce_sum(self.ctx, [1.0 if sigint.set else 0.0])[0] > 0
                if stop:
                    result.interrupted = True
                    break
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total_steps:
                    self.save("periodic")
        result.wall_s = time.perf_counter() - start
        result.steps_done = self.step
        result.peak_memory_bytes, result.peak_memory_added_bytes = mem.peak, mem.added
        self.save("interrupted" if result.interrupted else "end")
        self.log.write("train_end", **result.summary())
        return result
