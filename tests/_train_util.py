"""Tiny random-weight encoders and synthetic parallel groups for the training tests (seconds, not minutes)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from effir.data.groups import ParallelGroup, write_jsonl

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega river stone cloud leaf fire water").split()


def synthetic_groups(n: int = 64, seed: int = 0) -> list[ParallelGroup]:
    """n groups: every one in en + de, every second one also in zh (so cross batches mix pairs)."""
    rng = random.Random(seed)
    groups = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
        p = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + f" {i}"
        items = {"en": (q, p), "de": (q.upper(), p.upper())}
        if i % 2:
            items["zh"] = (q[::-1], p[::-1])
        groups.append(ParallelGroup(f"syn:{i}", "synthetic", items))
    return groups


def build_tiny_encoders(root: Path) -> dict[str, Path]:
    """Two saved random-weight BERT encoders (2 layers, hidden 32): "dropout" (p=0.1) and "nodrop" (p=0)."""
    from effir.encoders import random_encoder

    root = Path(root)
    drop = root / "tiny-dropout"
    enc = random_encoder("labse", seed=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, vocab_size=250002, hidden_dropout_prob=0.1,
                         attention_probs_dropout_prob=0.1, initializer_range=0.2)  # 0.02 gives near-equal embeddings
    enc.save_pretrained(drop)
    nodrop = root / "tiny-nodrop"
    shutil.copytree(drop, nodrop)
    cfg_path = nodrop / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hidden_dropout_prob"] = cfg["attention_probs_dropout_prob"] = 0.0
    cfg_path.write_text(json.dumps(cfg, indent=2))
    data = root / "groups.jsonl"
    write_jsonl(synthetic_groups(), data)
    return {"dropout": drop, "nodrop": nodrop, "data": data}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    from effir.training.metrics_log import read_jsonl

    return [(r["step"], r["loss"]) for r in read_jsonl(Path(run_dir) / "train_log.jsonl") if r["event"] == "step"]


def tiny_encoders(tmp_path_factory) -> dict[str, Path]:
    """`build_tiny_encoders` once per pytest session (shared by the test_train_* files)."""
    root = tmp_path_factory.getbasetemp() / "effir-train-tiny"
    done = root / "DONE"
    if not done.is_file():
        root.mkdir(parents=True, exist_ok=True)
        build_tiny_encoders(root)
        done.write_text("ok")
    return {"dropout": root / "tiny-dropout", "nodrop": root / "tiny-nodrop", "data": root / "groups.jsonl"}
