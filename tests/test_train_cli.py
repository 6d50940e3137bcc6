"""`python -m effir.train` as a process: torchrun with 2 gloo processes against 1 process, and Ctrl-C."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests._train_util import losses, tiny_encoders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_encoders(tmp_path_factory)


def _env():
    # one thread per process: two ranks on two cores, and the same per-op reduction order in both runs
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _args(tiny, out, *extra):
    return ["--model", str(tiny["nodrop"]), "--sources", str(tiny["data"]), "--batch-size", "8", "--steps", "4",
            "--lr", "1e-2", "--warmup", "0", "--reduction-factor", "4", "--no-eval", "--no-progress",
            "--max-query-length", "16", "--max-passage-length", "24", "--learnable-temperature",
            "--output-dir", str(out), *extra]


def test_two_process_loss_curve_matches_one_process(tiny, tmp_path):
    one = subprocess.run([sys.executable, "-m", "effir.train", *_args(tiny, tmp_path / "one")], env=_env(),
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "effir.train", *_args(tiny, tmp_path / "two")], env=_env(),
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    # Same global batch, the gathered passages as negatives on every rank, DDP-averaged gradients: the
    # same optimisation up to float reduction order.
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5), (a, b)  # seen: |diff| ~ 5e-7
    assert len({round(x, 4) for _, x in a}) > 1
    ta, tb = _temperatures(tmp_path / "one"), _temperatures(tmp_path / "two")
    assert tb == pytest.approx(ta, rel=1e-5) and ta[-1] != pytest.approx(0.05, rel=1e-4)  # learned, DDP-averaged
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    # every rank consumed its half of each global batch; examples are counted globally
    assert m1["training"]["examples"] == m2["training"]["examples"] == 32


def test_two_process_grad_cache_matches_one_process(tiny, tmp_path):
    """--mini-batch-size under torchrun (2 gloo processes, 2 texts per chunk): no DDP wrapper, one all-reduce
    of the gradients per step; the loss curve and learned temperature are the one-process whole-batch run's.
    With --hard-negatives 1 in both: every rank draws its items' negatives and the loss gathers them."""
    one = subprocess.run([sys.executable, "-m", "effir.train", *_args(tiny, tmp_path / "one", "--hard-negatives", "1")],
                         env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "effir.train", *_args(tiny, tmp_path / "two", "--mini-batch-size", "2",
                                                      "--hard-negatives", "1")],
                         env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5), (a, b)
    assert len({round(x, 4) for _, x in a}) > 1
    ta, tb = _temperatures(tmp_path / "one"), _temperatures(tmp_path / "two")
    assert tb == pytest.approx(ta, rel=1e-5) and ta[-1] != pytest.approx(0.05, rel=1e-4)


def _temperatures(run_dir):
    from effir.training.metrics_log import read_jsonl

    return [r["temperature"] for r in read_jsonl(run_dir / "train_log.jsonl") if r["event"] == "step"]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny, out)
    args[args.index("--steps") + 1] = "400"
    proc = subprocess.Popen([sys.executable, "-m", "effir.train", *args], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and '"event": "step"' in log.read_text():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "checkpoint saved" in err
    state_steps = [r for r in losses(out)]
    assert 1 <= len(state_steps) < 400
    done = len(state_steps)
    # resume with fewer total steps than planned: it continues from the checkpoint and stops at --steps
    res = subprocess.run([sys.executable, "-m", "effir.train", "--output-dir", str(out), "--resume",
                          "--steps", str(done + 2), "--no-progress"], env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [s for s, _ in losses(out)]
    assert steps == list(range(1, done + 3))
