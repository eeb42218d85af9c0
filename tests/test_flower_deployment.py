"""The launcher on a real local Flower deployment (a SuperLink and SuperNodes, each a process, on loopback): its
final models equal the simulation's, a killed SuperNode's round completes with the others, TLS refuses a SuperNode
whose key is not registered and one without TLS, bad input stops it before anything starts, and no process it
started is left behind, whether the run succeeds, fails or is interrupted."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import fedgan_utils as fu

pytest.importorskip("flwr")
from fedgan.flower.certificates import make_node_key  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
SMALL = {"preset": "smoke", "num_clients": 2, "train_subset": 1000, "eval_every": None}


def free_port_block(count: int) -> int:
    """A first port p with p .. p+count-1 free on loopback now."""
    for first in range(40000, 60000, 97):
        try:
            sockets = [socket.create_server(("127.0.0.1", first + i)) for i in range(count)]
        except OSError:
            continue
        for s in sockets:
            s.close()
        return first
    raise RuntimeError("no free block of ports")


class ProcessWatch:
    """Every process below `root` seen while it runs (pid and start time, so a reused pid is not mistaken)."""

    def __init__(self, root: int):
        self.root, self.seen, self.running = root, {}, True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    @staticmethod
    def stat(pid: int):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return int(fields[1]), fields[19], fields[0]  # ppid, start time, state

    def _watch(self):
        while self.running:
            parents = {}
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and (info := self.stat(int(entry.name))):
                    parents.setdefault(info[0], []).append((int(entry.name), info[1]))
            stack = [self.root]
            while stack:
                for pid, started in parents.get(stack.pop(), []):
                    self.seen[pid] = started
                    stack.append(pid)
            time.sleep(0.1)

    def alive(self) -> list[int]:
        self.running = False
        self.thread.join()
        return [pid for pid, started in self.seen.items()
                if (info := self.stat(pid)) and info[1] == started and info[2] != "Z"]


def launch(tmp_path, config: dict, supernodes: int, *extra: str, name: str = "run"):
    """The launcher as a user starts it from a terminal, in its own process, watched. Ctrl-C's signal is given its
    default disposition: a suite started in the background by a shell without job control inherits SIGINT ignored,
    and Python then never raises KeyboardInterrupt (the Ctrl-C test would see a launcher that cannot be stopped)."""
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    out = tmp_path / name
    process = subprocess.Popen([sys.executable, "-m", "fedgan.flower", "--config", str(tmp_path / f"{name}.json"),
                                "--supernodes", str(supernodes), "--out", str(out), *extra],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **QUIET},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return process, ProcessWatch(process.pid), out


def finish(process, watch, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    left = watch.alive()
    assert len(watch.seen) >= 4, watch.seen  # it did start a deployment
    assert not left, f"processes left behind: {left}"
    return stdout, stderr


def simulated(out: Path) -> fu.Federation:
    """The simulation of the launched config, at the nodes' thread count (it orders the float reductions)."""
    config = fu.FedConfig.from_json((out / "config.json").read_text())
    config = fu.FedConfig(**{**config.__dict__, "checkpoint_dir": str(out.parent / "sim"),
                             "out_dir": str(out.parent / "sim_out")})
    threads = torch.get_num_threads()
    torch.set_num_threads(json.loads((out / "launch.json").read_text())["threads_per_supernode"])
    try:
        return fu.Federation(config, log=False).run(progress=False)
    finally:
        torch.set_num_threads(threads)


def assert_equal_to_simulation(out: Path) -> fu.Federation:
    simulation, saved = simulated(out), fu.load_checkpoint(out / "final.pt")
    for name in ("generator", "discriminator"):
        state = getattr(simulation, name).state_dict()
        assert all(torch.equal(state[k], saved[name][k]) for k in state), name
    history = json.loads((out / "history.json").read_text())
    for ours, theirs in zip(history, simulation.history, strict=True):
        for key in ("clients", "d_loss_clients", "g_loss_clients", "images_total", "bytes_up", "bytes_down"):
            assert ours[key] == theirs[key], (ours["round"], key)
        assert ours["wire_bytes_up"] >= ours["bytes_up"] and ours["wire_bytes_down"] >= ours["bytes_down"]
    generator = fu.load_generator(out / "final.pt")
    assert torch.equal(fu.generate(generator, [7] * 4, seed=1), fu.generate(simulation.generator, [7] * 4, seed=1))
    return simulation


def test_a_supernode_killed_mid_run_loses_its_round_and_the_launcher_says_so(tmp_path):
    port = free_port_block(3)
    process, watch, out = launch(tmp_path, SMALL, 2, "--port", str(port), "--round-timeout", "30")
    deadline = time.time() + 240
    while not ((out / "history.json").exists() and json.loads((out / "history.json").read_text())):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)
    node = next(pid for pid in list(watch.seen) if command(pid) == "flower-supernode"
                and b"partition-id=1" in Path(f"/proc/{pid}/cmdline").read_bytes())
    os.kill(node, signal.SIGKILL)  # client 1's SuperNode crashes after round 1
    stdout, stderr = finish(process, watch)
    assert process.returncode == 1, stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [r["clients"] for r in history] == [[0, 1], [0]]
    assert sorted(history[1]["failed"]) == ["1"] and "node" in history[1]["failed"]["1"]
    assert "rounds lost results: round 2: clients [1]" in stderr and "supernode1 (exit -9)" in stderr
    assert (out / "final.pt").exists()  # the run itself completed, with the clients that replied


def test_over_tls_a_stranger_supernode_is_refused_and_the_run_equals_the_simulation(tmp_path):
    """One run through every path: a Dirichlet split, FedAdam at the server, each client's Adam state kept on its
    node between rounds, and the DP-FedAvg-GAN layout (D clipped and noised, G trained at the server), evaluated;
    over TLS with SuperNode authentication, while a SuperNode whose key is not registered and one without TLS try to
    join (as partition 0). Both are refused, and the run computes what the simulation computes, bit for bit."""
    config = {**SMALL, "partition": "dirichlet", "alpha": 0.5, "strategy": "fedadam", "optimizer_state": "keep",
              "dp_clip": 1.0, "dp_noise_multiplier": 0.3, "gan_layout": "server_g", "eval_every": 2,
              "eval_samples": 200, "classifier_subset": 2000}
    port = free_port_block(3)
    process, watch, out = launch(tmp_path, config, 2, "--tls", "--port", str(port))
    certificates, node_log = out / "flower" / "certs" / "ca.crt", out / "flower" / "supernode0.log"
    deadline = time.time() + 120
    while not (node_log.exists() and "SuperNode ID" in node_log.read_text()):  # the SuperLink is serving
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)
    stranger_key, _ = make_node_key(tmp_path / "stranger", "key")
    strangers = {
        "unregistered key": ["--root-certificates", str(certificates), "--auth-supernode-private-key",
                             str(stranger_key), "--max-retries", "3"],
        "no TLS": ["--insecure", "--max-retries", "3"],
    }
    started = {}
    for i, (what, flags) in enumerate(strangers.items()):
        started[what] = subprocess.Popen(
            [str(BIN / "flower-supernode"), *flags, "--superlink", f"127.0.0.1:{port}", "--host", "127.0.0.1",
             "--port", str(free_port_block(1) + i), "--node-config", "partition-id=0 num-partitions=2"],
            stdout=open(tmp_path / f"stranger{i}.log", "w"), stderr=subprocess.STDOUT,
            env={**os.environ, **QUIET, "FLWR_HOME": str(tmp_path / f"stranger{i}"),
                 "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}, start_new_session=True)  # its flower-superexec
    try:
        for p in started.values():
            p.wait(timeout=120)
        logs = {what: (tmp_path / f"stranger{i}.log").read_text() for i, what in enumerate(started)}
    finally:
        for p in started.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert started["unregistered key"].returncode != 0 and "Failed to activate SuperNode" in logs["unregistered key"]
    assert started["no TLS"].returncode != 0, logs["no TLS"][-2000:]
    stdout, stderr = finish(process, watch)
    assert process.returncode == 0, stderr[-3000:]
    assert "done in" in stdout
    simulation = assert_equal_to_simulation(out)
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["server_g_loss"] == simulation.history[-1]["server_g_loss"]
    assert history[-1]["metrics"]["fid"] == pytest.approx(simulation.history[-1]["metrics"]["fid"], rel=1e-6)
    assert json.loads((out / "launch.json").read_text())["status"] == "finished:completed"


def test_ctrl_c_tears_the_deployment_down(tmp_path):
    """Interrupted while the ServerApp and the ClientApps run (processes of processes of the ones it started)."""
    process, watch, out = launch(tmp_path, {**SMALL, "rounds": 20}, 2, "--port", str(free_port_block(3)))
    deadline = time.time() + 180
    while not {"flwr-serverapp", "flwr-clientapp"} <= {command(pid) for pid in list(watch.seen)}:
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = finish(process, watch, timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    assert "the launcher was interrupted" in stderr


def command(pid: int) -> str:
    """The program a process runs (the script's name for a Python entry point), '' once it is gone."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return next((Path(w.decode()).name for w in words[:2] if b"flwr" in w or b"flower" in w), "")


@pytest.mark.parametrize("change, match", [
    (dict(config={**SMALL, "num_client": 2}), "num_client"),
    (dict(supernodes=1), "fewer than the 2 clients a round trains"),
    (dict(supernodes=3), "more than the config's 2 clients"),
    (dict(config={**SMALL, "sync_mode": "async"}), "synchronous rounds only"),
    (dict(busy=True), "is busy"),
    (dict(taken=True), "holds a run already (config.json)"),  # a run still in its first round: nothing else yet
])
def test_bad_input_is_a_clear_error_before_anything_starts(tmp_path, change, match):
    port = free_port_block(3)
    blocker = socket.create_server(("127.0.0.1", port + 1)) if change.get("busy") else None
    if change.get("taken"):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "config.json").write_text("another run's")
    try:
        (tmp_path / "config.json").write_text(json.dumps(change.get("config", SMALL)))
        result = subprocess.run([sys.executable, "-m", "fedgan.flower", "--config", str(tmp_path / "config.json"),
                                 "--supernodes", str(change.get("supernodes", 2)), "--out", str(tmp_path / "out"),
                                 "--port", str(port)], cwd=REPO, capture_output=True, text=True, timeout=120,
                                env={**os.environ, **QUIET})
    finally:
        if blocker:
            blocker.close()
    assert result.returncode == 2 and match in result.stderr, result.stderr
    assert not (tmp_path / "out" / "flower" / "superlink.log").exists()
    if change.get("taken"):
        assert (tmp_path / "out" / "config.json").read_text() == "another run's"
