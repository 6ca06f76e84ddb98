"""Multi-process training: the same code path a multi-GPU instance runs under ``torchrun`` with
NCCL, here with 2 CPU processes and the gloo backend."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from training.checkpoint import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slice(src: Path, dest: Path, per_label: int, n_labels: int) -> Path:
    rows, seen = [], {}
    with open(src, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            c = row["category"]
            if (c in seen or len(seen) < n_labels) and seen.get(c, 0) < per_label:
                seen[c] = seen.get(c, 0) + 1
                rows.append(row)
    with open(dest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows(rows)
    return dest


def test_two_process_ddp_trains_one_model_with_per_rank_state(data_dir, minilm_2layer, tmp_path):
    # 8 labels x 8 rows = 64 examples = 8 batches of 8; 2 ranks take 4 each: 4 steps per epoch.
    train_csv = _slice(data_dir / "banking77" / "train.csv", tmp_path / "train.csv", 8, 8)
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
        f"--master-port={_free_port()}", "-m", "training.worker",
        "--train", str(train_csv), "--label-column", "category", "--output-dir", str(out),
        "--model-dir", str(minilm_2layer), "--max-seq-len", "32", "--batch-size", "8", "--epochs", "2",
        "--lr", "1e-3", "--num-threads", "1", "--freeze-embeddings", "--no-progress-bar",
        "--checkpoint-every-steps", "3",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # No dev split given: 10 % of train is held out (6 rows), 58 left = 7 full batches of 8 + 1;
    # 8 batches over 2 ranks = 4 each = 4 optimizer steps per epoch.
    result = json.loads((out / "train_result.json").read_text())
    assert result["status"] == "completed"
    assert result["total_steps"] == result["steps"] == 8
    # Only rank 0 evaluates and prints: one JSON line per epoch.
    evals = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"accuracy"')]
    assert [e["step"] for e in evals] == [4, 8]
    assert "world_size" in proc.stderr and '"world_size": 2' in proc.stderr

    # Checkpoints hold every rank's RNG state so a resumed DDP run replays the same dropout.
    steps = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert steps[-1] == 8
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[-1][1])
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert (out / "model" / "model.safetensors").is_file()
