"""`trpo-ext train --nproc N` end to end: learning, a killed or hung rank, elastic restarts, two
torchrun "nodes" on this machine (docs/distributed.md), Ctrl-C and --resume."""
import os
import signal
import subprocess
import sys
import time

import torch

import trpo_ext
from trpo_ext import checkpoint

from helpers import assert_same_run, progress_rows

FAST = ["--n-steps", "64", "--n-envs", "2", "--eval-episodes", "1", "--no-progress"]


# The commands run from a temporary directory: `python -m trpo_ext` must import the installed package,
# not a source tree that happens to be the working directory (.ci/compat tests from an unbuilt copy).
def train(*args, timeout=300, cwd=None):
    return subprocess.run([sys.executable, "-m", "trpo_ext", "train", "CartPole-v1", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=cwd)


def test_nproc_2_learns_cartpole(tmp_path):
    proc = train("--nproc", "2", "--timesteps", "100000", "--out", str(tmp_path / "run"), "--no-progress",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks x 8 envs, split update" in proc.stdout
    mean = float(proc.stdout.split("deterministic evaluation over 10 episodes: ")[1].split()[0])
    assert mean >= 475, proc.stdout
    agent = trpo_ext.TRPO.load(tmp_path / "run" / "model.pt")
    assert agent.num_timesteps >= 100000
    agent.close()


def _workers(launcher_pid: int) -> list[int]:
    """The launcher's rank processes (its children running `-m trpo_ext train`)."""
    out = subprocess.run(["pgrep", "-P", str(launcher_pid), "-f", "trpo_ext train"], capture_output=True, text=True)
    return sorted(int(pid) for pid in out.stdout.split())


def _start_and_wait_for_checkpoint(tmp_path, *args):
    cmd = [sys.executable, "-m", "trpo_ext", "train", "CartPole-v1", "--nproc", "2", "--out", str(tmp_path / "run"),
           *FAST, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "model.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before its first checkpoint"
        time.sleep(0.1)
    workers = _workers(proc.pid)
    assert len(workers) == 2, workers
    return proc, workers


def test_a_killed_rank_restarts_from_the_checkpoint_and_finishes(tmp_path):
    proc, workers = _start_and_wait_for_checkpoint(tmp_path, "--timesteps", "60000", "--max-restarts", "1",
                                                   "--save-every", "2")
    os.kill(workers[1], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resuming" in stdout and "at 0 steps" not in stdout
    agent = trpo_ext.TRPO.load(tmp_path / "run" / "model.pt")
    assert agent.num_timesteps >= 60000
    agent.close()
    rows = (tmp_path / "run" / "progress.csv").read_text().splitlines()[1:]
    updates = [int(r.split(",")[0]) for r in rows]
    assert updates == list(range(1, len(updates) + 1))  # no update logged twice across the restart


def test_without_restarts_a_killed_rank_fails_the_run_quickly(tmp_path):
    proc, workers = _start_and_wait_for_checkpoint(tmp_path, "--timesteps", "10000000", "--save-every", "1",
                                                   "--dist-timeout", "20")
    killed = time.time()
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - killed < 30
    assert "the data-parallel run failed" in stderr
    torch_load = trpo_ext.TRPO.load(tmp_path / "run" / "model.pt")  # the last checkpoint is whole
    torch_load.close()


def test_a_hung_rank_makes_the_others_fail_within_the_timeout_naming_it(tmp_path):
    proc, workers = _start_and_wait_for_checkpoint(tmp_path, "--timesteps", "10000000", "--save-every", "1",
                                                   "--dist-timeout", "5")
    stopped = time.time()
    os.kill(workers[1], signal.SIGSTOP)  # alive but stuck
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    assert time.time() - stopped < 90  # the 5 s timeout, then the launcher's shutdown of the stuck rank
    assert "rank 0: a collective failed or waited past the process group's timeout" in stderr
    assert "ranks not responding: rank 1)" in stderr


def test_two_torchrun_nodes_train_like_nproc_2(tmp_path):
    common = ["--timesteps", "4096", *FAST, "--seed", "3"]
    local = train("--nproc", "2", "--out", str(tmp_path / "local"), *common, cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    port = 29_000 + os.getpid() % 1000
    # Each node's output goes to a file: with pipes read one after the other, a node whose output
    # fills its pipe blocks, and the other waits for it at torchrun's exit barrier.
    logs = [open(tmp_path / f"node{node}.log", "w+") for node in (0, 1)]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
         "--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "trpo_ext", "train",
         "CartPole-v1", "--out", str(tmp_path / "nodes"), *common],
        stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path, start_new_session=True) for node, log in zip((0, 1), logs)]
    try:
        for node in nodes:
            node.wait(timeout=300)
    finally:
        for node in nodes:  # the launcher and its worker, whatever state they are in
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    assert all(node.returncode == 0 for node in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    a = trpo_ext.TRPO.load(tmp_path / "local" / "model.pt")
    b = trpo_ext.TRPO.load(tmp_path / "nodes" / "model.pt")
    for p, q in zip(a.policy.parameters(), b.policy.parameters()):
        assert torch.equal(p, q)
    assert a.num_timesteps == b.num_timesteps
    a.close(), b.close()


def _start(tmp_path, out, *args):
    """`train --nproc 2` in a session of its own (its ranks start their own), as a shell runs it."""
    cmd = [sys.executable, "-m", "trpo_ext", "train", "CartPole-v1", "--nproc", "2", "--out", str(out), *FAST, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def _wait_for_rows(proc, out, n):
    deadline = time.time() + 120
    while not (out / "progress.csv").is_file() or len(progress_rows(out)) < n:
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before logging an update"
        time.sleep(0.1)


def _communicate(proc, timeout=120):
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_ctrl_c_stops_the_ranks_together_saved_and_resume_equals_the_uninterrupted_run(tmp_path):
    """2 ranks interrupted (Ctrl-C) after they logged updates, then resumed on 2 ranks to a step count,
    are bitwise the 2 ranks that went there at once: model.pt (networks, critic optimizer, every rank's
    random stream and episodes) and every computed column of progress.csv."""
    out = tmp_path / "run"
    proc = _start(tmp_path, out, "--timesteps", "10000000")
    _wait_for_rows(proc, out, 2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the launcher's process group (the ranks have their own)
    stdout, stderr = _communicate(proc)
    assert proc.returncode == 130 and stderr == "", stderr  # no traceback, no gloo "Connection closed by peer"
    steps = checkpoint.read(out / "model.pt")["num_timesteps"]
    assert stdout.splitlines()[-1] == (
        f"interrupted at {steps} steps; saved {out}/model.pt; continue with `trpo-ext train CartPole-v1 --nproc 2 "
        f"{' '.join(FAST)} --timesteps 10000000 --out {out} --resume`")
    assert len(progress_rows(out)) == steps // 256 and (out / "learning_curve.png").is_file()

    resumed = train("--nproc", "2", *FAST, "--timesteps", str(steps + 3 * 256), "--out", str(out), "--resume",
                    cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out}/model.pt at {steps} steps on 2 ranks, exactly where it stopped\n" in resumed.stdout
    assert not (tmp_path / "run_2").exists()  # the same directory, not a fresh run
    assert [int(row["update"]) for row in progress_rows(out)] == list(range(1, steps // 256 + 4))  # no row twice
    assert checkpoint.read(out / "model.pt")["num_timesteps"] == steps + 3 * 256
    straight = train("--nproc", "2", *FAST, "--timesteps", str(steps + 3 * 256), "--out", str(tmp_path / "straight"),
                     cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_same_run(out, tmp_path / "straight")

    # At another world size: one rank continues the 2 ranks' checkpoint, and says how exactly.
    single = train(*FAST, "--timesteps", str(steps + 4 * 256), "--out", str(out), "--resume", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "saved by 2 ranks, now 1 (128 steps per update instead of 256)" in single.stdout
    assert [int(row["update"]) for row in progress_rows(out)] == list(range(1, steps // 256 + 6))


def test_a_signal_to_one_rank_stops_them_all_saved(tmp_path):
    out = tmp_path / "run"
    proc = _start(tmp_path, out, "--timesteps", "10000000", "--max-restarts", "1")
    _wait_for_rows(proc, out, 2)
    os.kill(_workers(proc.pid)[1], signal.SIGTERM)  # a scheduler's, say: the other rank hears of it
    stdout, stderr = _communicate(proc)
    assert proc.returncode == 130 and "Traceback" not in stderr and "Connection closed" not in stderr, stderr
    steps = checkpoint.read(out / "model.pt")["num_timesteps"]
    assert stdout.splitlines()[-1].startswith(f"interrupted at {steps} steps; saved {out}/model.pt; continue with")
    assert "resuming" not in stdout  # stopped, not restarted (--max-restarts 1 would restart a failed rank)


def test_resume_with_nproc_refuses_a_directory_without_a_checkpoint_before_starting_ranks(tmp_path):
    proc = train("--nproc", "2", *FAST, "--out", str(tmp_path / "none"), "--resume", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"trpo-ext train: error: --resume: {tmp_path}/none holds no model.pt to continue; drop "
                           "--resume to start a run there\n")
