"""`TrainConfig`: every knob of `python -m effir.train`, loadable from a JSON or TOML file.

Precedence: dataclass defaults < config file (`--config FILE`) < command-line flags.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

SAMPLING = ("mono", "cross", "hybrid")
ADAPTERS = ("seq_bn", "double_seq_bn", "par_bn", "none")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
EVAL_SETS = ("xquad-r", "mlqa-r")

# The default training mix (issue 7): parallel BiPaR + XLingHealth, monolingual TQuAD, ARCD, CMRC 2018, iApp.
DEFAULT_SOURCES = ("bipar", "xlinghealth", "tquad", "arcd", "cmrc2018", "iapp")


@dataclass
class TrainConfig:
    """Configuration of one training run (all fields JSON-serialisable).

    Sizes are global: `batch_size` is the number of (query, passage) pairs per optimizer step summed over
    all data-parallel ranks; every rank encodes `batch_size // world_size` of them.
    """

    # model
    model: str = "multilingual-e5-small"  # the embedded default: multilingual-e5-small, 4-bit weights
    adapters: str = "seq_bn"  # "none" = full fine-tuning
    reduction_factor: float | None = None  # None: the adapter config's own default (16 for seq_bn)
    # an adapter directory to start from (effir.save_adapters or AdapterHub's save_adapter); its saved config
    # sets the architecture, so --adapters / --reduction-factor do not apply
    init_adapters: str | None = None
    gradient_checkpointing: bool = False
    unpad: bool = True  # encoder runs on real tokens only (effir.encoders.packed); False: the padded forward
    # data
    sources: list[str] = field(default_factory=lambda: list(DEFAULT_SOURCES))
    languages: list[str] | None = None  # None: every language the sources hold
    passage: str = "sentence"  # "sentence" (LAReQA style) or "chunk"
    sampling: str = "hybrid"
    alpha: float = 0.5
    language_weights: str = "uniform"
    batch_size: int = 32
    # short limits keep the default CPU run at a few minutes; answer sentences rarely need more
    max_query_length: int = 32
    max_passage_length: int = 64
    # optimisation (AdamW; the paper's 3e-5 is for full fine-tuning, adapters want a larger rate)
    lr: float | None = None  # None: 1e-3 with adapters (short runs), 3e-5 for full fine-tuning
    weight_decay: float = 0.01
    warmup: float = 0.1  # < 1: fraction of the steps; >= 1: number of steps
    max_grad_norm: float | None = 1.0
    # GradCache: the encoder works through this many texts at a time (memory independent of batch_size, the
    # same gradients, one extra encoder forward); None: the whole per-rank batch at once
    mini_batch_size: int | None = None
    # hard negatives per pair (effir.data.batching.HardNegatives): the other sentences of the answer's paragraph
    # (SQuAD-format sources), else random passages of the same language; 0: in-batch negatives only
    hard_negatives: int = 0
    temperature: float = 0.05
    learnable_temperature: bool = False
    steps: int | None = None  # optimizer steps; None: from `epochs`, or the default budget
    epochs: float | None = None
    precision: str = "auto"  # auto: bf16 on a GPU that supports it, fp32 on CPU
    loss_backend: str = "auto"
    # the adapters' fused op (effir.backends): auto = the measured choice per device and dtype mix
    adapter_backend: str = "auto"
    device: str | None = None  # None: cuda if available, else cpu
    seed: int = 0
    # evaluation
    eval_sets: list[str] = field(default_factory=lambda: list(EVAL_SETS))
    eval_full: bool = False
    eval_max_paragraphs: int | None = None  # None: the small CPU default unless eval_full
    eval_batch_size: int = 64
    eval_before: bool = True
    eval_after: bool = True
    eval_cache: bool = True
    # output
    output_dir: str | None = None  # None: a fresh folder under runs/
    resume: bool = False
    save_every: int = 0  # checkpoint every N steps (0: only at the end and on Ctrl-C)
    log_every: int = 1
    progress: bool = True

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "TrainConfig":
        unknown = sorted(set(data) - set(cls.fields()))
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {unknown}; known options: {cls.fields()}")
        cfg = cls()
        for key, value in data.items():
            setattr(cfg, key, value)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """Load a JSON (`.json`) or TOML (`.toml`) file of TrainConfig fields (dashes allowed in keys)."""
        return cls.from_dict(read_config_file(path), source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ---- derived values ----------------------------------------------------------------------------
    @property
    def train_adapters(self) -> bool:
        return self.adapters != "none"

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 1e-3 if self.train_adapters else 3e-5

    def warmup_steps(self, total_steps: int) -> int:
        if self.warmup < 1:
            return int(round(self.warmup * total_steps))
        return int(self.warmup)

    # ---- checks (before anything heavy runs) --------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the option for any value out of range. Returns self."""
        def choice(name, value, choices):
            if value not in choices:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {choices}, got {value!r}")

        def integer(name, value, minimum, optional=True):
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
                raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")

        def positive(name, value, allow_zero=False):
            if value is None:
                return
            if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
                raise ValueError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        choice("sampling", self.sampling, SAMPLING)
        choice("adapters", self.adapters, ADAPTERS)
        choice("precision", self.precision, PRECISIONS)
        choice("passage", self.passage, ("sentence", "chunk"))
        for name in self.eval_sets:
            choice("eval_sets", name, EVAL_SETS)
        if not (0.0 <= float(self.alpha) <= 1.0):
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"--batch-size must be an integer >= 2 (in-batch negatives), got {self.batch_size!r}")
        for name in ("max_query_length", "max_passage_length", "eval_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        positive("lr", self.lr)
        positive("weight_decay", self.weight_decay, allow_zero=True)
        positive("warmup", self.warmup, allow_zero=True)
        positive("temperature", self.temperature)
        positive("reduction_factor", self.reduction_factor)
        positive("max_grad_norm", self.max_grad_norm)
        positive("epochs", self.epochs)
        positive("eval_max_paragraphs", self.eval_max_paragraphs)
        positive("save_every", self.save_every, allow_zero=True)
        integer("mini_batch_size", self.mini_batch_size, 1)
        integer("hard_negatives", self.hard_negatives, 0, optional=False)
        integer("steps", self.steps, 1)
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either --steps or --epochs, not both")
        if not self.sources:
            raise ValueError("--sources must name at least one training source")
        if self.init_adapters is not None:
            if not self.train_adapters:
                raise ValueError("--init-adapters starts adapter training from a saved adapter; it cannot go with "
                                 "--adapters none (full fine-tuning)")
            if self.reduction_factor is not None:
                raise ValueError("--reduction-factor cannot change an adapter loaded by --init-adapters (its saved "
                                 "config sets the architecture)")
            if not Path(self.init_adapters).is_dir():
                raise ValueError(f"--init-adapters: not a directory: {self.init_adapters}")
        from effir.backends import ADAPTER_BACKENDS

        if self.adapter_backend not in ADAPTER_BACKENDS + ("auto",):
            raise ValueError(f"--adapter-backend must be one of {', '.join(('auto',) + ADAPTER_BACKENDS)}, got "
                             f"{self.adapter_backend!r}")
        if self.adapter_backend != "auto" and not self.train_adapters:
            raise ValueError("--adapter-backend picks the adapters' op; it cannot go with --adapters none (full "
                             "fine-tuning)")
        if self.resume and not self.output_dir:
            raise ValueError("--resume needs --output-dir (the run folder holding checkpoint/)")
        return self


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--config: {path} is not valid TOML: {exc}") from None
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config: {path} is not valid JSON: {exc}") from None
    else:
        raise ValueError(f"--config: expected a .json or .toml file, got {path.name!r}")
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a table/object of options, got {type(data).__name__}")
    # The file may use the flag spelling (`batch-size`) or the field spelling (`batch_size`).
    return {str(k).replace("-", "_"): v for k, v in data.items()}
