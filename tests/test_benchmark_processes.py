"""`steerdiff benchmark` across processes: sharding under `accelerate launch` gives the samples of a single
process, and a run killed mid-grid resumes without recomputing finished work and ends with the same numbers."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from steerdiff.benchmark import BenchmarkConfig, run_benchmark
from steerdiff.benchmark.storage import RunFolder

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _write_config(path: Path, model_dir: Path, output: Path, metrics=("divergence",), **extra) -> Path:
    cfg = {"output_dir": str(output), "models": [{"model": str(model_dir), "label": "tiny", "metrics": list(metrics)}],
           "schedulers": ["ddim", "plms"], "guidance": [{"scale": 1}, {"scale": 3}], "nfe": [3], "num_samples": 10,
           "batch_size": 3, "device": "cpu", "progress": False, "cache_dir": str(path.parent / "cache"), **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _in_process(config: Path, output: Path) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1), so float reductions run alike
    try:
        cfg = BenchmarkConfig.model_validate({**yaml.safe_load(config.read_text()), "output_dir": str(output)})
        return run_benchmark(cfg)
    finally:
        torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_and_two_processes_give_the_same_samples(tmp_path, tiny_model_dir):
    config = _write_config(tmp_path / "shard.yaml", tiny_model_dir, tmp_path / "two")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "steerdiff", "benchmark", "--config", str(config)]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one = _in_process(config, tmp_path / "one")
    two = [json.loads(line) for line in (tmp_path / "two" / "results.jsonl").read_text().splitlines()]
    assert [r["cell_id"] for r in one] == [r["cell_id"] for r in two] and len(one) == 4
    for r1, r2 in zip(one, two):
        assert (r1["world_size"], r2["world_size"]) == (1, 2)
        chunks1 = [RunFolder(tmp_path / "one").load_chunk(r1["cell_id"], k) for k in range(4)]
        chunks2 = [RunFolder(tmp_path / "two").load_chunk(r2["cell_id"], k) for k in range(4)]
        assert [c.rank for c in chunks2] == [0, 1, 0, 1]  # the samples really were split
        for c1, c2 in zip(chunks1, chunks2):
            torch.testing.assert_close(c1.samples, c2.samples, atol=1e-5, rtol=0)
            assert torch.equal(c1.labels, c2.labels)
        assert r1["metrics"] == pytest.approx(r2["metrics"], rel=1e-5, abs=1e-6)


def _snapshot(run: Path) -> dict[Path, tuple[int, str]]:
    files = list(run.glob("cells/*/chunk_*.safetensors")) + list(run.glob("cells/*/record.json"))
    return {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def test_killed_run_resumes_without_recomputing(tmp_path, tiny_model_dir):
    config = _write_config(tmp_path / "resume.yaml", tiny_model_dir, tmp_path / "killed", metrics=("divergence", "fd"),
                           schedulers=["ddim", "dpmpp_2m"], nfe=[4, 6], num_samples=12, batch_size=3)
    cmd = [sys.executable, "-m", "steerdiff", "benchmark", "--config", str(config)]
    run = tmp_path / "killed"

    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not list(run.glob("cells/*/record.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert still_running, f"the run ended before it could be killed: {err.decode()[-2000:]}"
    before = _snapshot(run)
    finished = len(list(run.glob("cells/*/record.json")))
    assert 1 <= finished < 8

    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{finished} finished earlier and reused" in again.stdout
    after = _snapshot(run)
    assert all(after[p] == before[p] for p in before)  # nothing that existed was rewritten
    assert len(list(run.glob("cells/*/record.json"))) == 8

    resumed = {json.loads(line)["cell_id"]: json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()}
    uninterrupted = _in_process(config, tmp_path / "whole")
    for record in uninterrupted:
        assert resumed[record["cell_id"]]["metrics"] == record["metrics"]
        for k in range(4):
            a = RunFolder(run).load_chunk(record["cell_id"], k).samples
            assert torch.equal(a, RunFolder(tmp_path / "whole").load_chunk(record["cell_id"], k).samples)
