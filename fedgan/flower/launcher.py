"""python -m fedgan.flower: a local Flower deployment of a FedConfig's federation on loopback.

One SuperLink and N SuperNodes, each a process of its own (own FLWR_HOME, own port, own process group), the App run
on them with `flwr run`, waited for, and every process it started torn down (TERM, then KILL) however the run ends.
It exits non-zero, saying why, when the run did not complete, a round lost a client's results or a process died.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import fedgan
from fedgan.config import FedConfig, clients_per_round, preset
from fedgan.flower.certificates import make_node_key, make_tls_files
from fedgan.flower.remote import RemoteFederation, check_remote_config

APP_DIR = Path(__file__).resolve().parent / "app"
HOST = "127.0.0.1"  # loopback only: --insecure is for this, never for real machines
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}
POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}  # seconds a SuperExec waits to look for a task (default 1)
FEDERATION = "fedgan-local"  # the CLI's name for the launcher's SuperLink


class LaunchError(RuntimeError):
    """What stops a launch before (or instead of) a run: said in one message, the exit code 2."""


def load_config(path: Path) -> FedConfig:
    """A FedConfig from a JSON file: its fields, and optionally "preset" naming the base ("smoke", "cpu", "full")."""
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LaunchError(f"--config {path}: {error}") from error
    if not isinstance(values, dict):
        raise LaunchError(f"--config {path}: a JSON object of FedConfig fields, got {type(values).__name__}")
    name = values.pop("preset", None)
    try:
        if "engine" in values or name is None:
            base = dataclasses.asdict(preset(name)) if name else {}
            return FedConfig.from_json(json.dumps({**base, **values}))
        return preset(name, **values)
    except (TypeError, ValueError) as error:
        raise LaunchError(f"--config {path}: {error}") from error


def check_plan(config: FedConfig, supernodes: int) -> None:
    """The run's shape against the SuperNodes, before anything starts."""
    try:
        check_remote_config(config)
    except ValueError as error:
        raise LaunchError(str(error)) from error
    needed = clients_per_round(config.num_clients, config.client_fraction)
    if supernodes < needed:
        raise LaunchError(f"--supernodes {supernodes} is fewer than the {needed} clients a round trains "
                          f"(num_clients={config.num_clients} x client_fraction={config.client_fraction}); each of "
                          f"a round's clients needs a SuperNode: use --supernodes {needed} to {config.num_clients}")
    if supernodes > config.num_clients:
        raise LaunchError(f"--supernodes {supernodes} is more than the config's {config.num_clients} clients: "
                          f"{supernodes - config.num_clients} SuperNodes would hold none")


def check_ports(ports: Sequence[int]) -> None:
    """Each port free on loopback, or a clear error naming the busy one."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is free
            try:
                probe.bind((HOST, port))
            except OSError as error:
                raise LaunchError(f"port {port} on {HOST} is busy ({error.strerror}); the launcher needs ports "
                                  f"{ports[0]}-{ports[-1]}: choose others with --port") from error


class Processes:
    """The processes the launcher started, each in a process group of its own, and every process below them.

    Flower's daemons start SuperExecs in sessions of their own, and those start the ServerApp and ClientApps: a
    process group does not hold them all, and a killed parent leaves its children to init. So the launcher surveys
    the processes below the ones it started (Linux's /proc) while it waits, and stops each it saw, identified by pid
    and start time so that a pid the system gave to another process since is left alone.
    """

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env = folder, env
        self.started: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, str] = {}  # pid -> start time, of every process below the started ones

    def start(self, name: str, command: list[str], home: Path, threads: int | None = None) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "FLWR_HOME": str(home), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        with open(self.folder / f"{name}.log", "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       env=env)
        self.started[name] = process
        self.seen[process.pid] = _start_time(process.pid) or ""
        return process

    def survey(self) -> None:
        """Note every live process below the started ones (and below those seen before)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
            if entry.name.isdigit() and (parent := _parent(int(entry.name))) is not None:
                children.setdefault(parent, []).append(int(entry.name))
        stack = [pid for pid, started in self.seen.items() if _start_time(pid) == started]
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in self.seen and (started := _start_time(child)):
                    self.seen[child] = started
                    stack.append(child)

    def died(self) -> dict[str, int]:
        """name -> exit code of each started process that is no longer running."""
        return {name: p.returncode for name, p in self.started.items() if p.poll() is not None}

    def alive(self) -> list[int]:
        """The seen processes still running (zombies aside)."""
        return [pid for pid, started in self.seen.items() if _start_time(pid) == started and not _zombie(pid)]

    def stop(self, grace: float = 10.0) -> None:
        """TERM every process seen, then KILL what is left after `grace` seconds: the launcher's processes only."""
        self.survey()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.alive():
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
            while self.alive() and time.monotonic() < deadline:
                for process in self.started.values():
                    process.poll()  # reap the launcher's own children
                time.sleep(0.1)
        for process in self.started.values():
            process.wait()


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None


def _zombie(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] == "Z"


def wait_until(condition, timeout: float, what: str, processes: Processes) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        processes.survey()
        if processes.died():
            raise LaunchError(f"{what}: {', '.join(f'{n} exited ({c})' for n, c in processes.died().items())}; "
                              f"see the logs in {processes.folder}")
        if time.monotonic() > deadline:
            raise LaunchError(f"{what}: not within {timeout:.0f} s; see the logs in {processes.folder}")
        time.sleep(0.2)


def flwr_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """The flwr CLI, its output plain (a Jupyter kernel's FORCE_COLOR would colour even its JSON)."""
    plain = {k: v for k, v in env.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE")}
    done = subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], env={**plain, "NO_COLOR": "1"},
                          capture_output=True, text=True, timeout=timeout)
    done.stdout = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedgan.flower", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="FedConfig fields as JSON (and \"preset\")")
    parser.add_argument("--supernodes", type=int, required=True, help="SuperNodes to start (each holds clients "
                        "c with c %% N == its partition-id)")
    parser.add_argument("--out", type=Path, required=True, help="folder for final.pt, history.json and logs")
    parser.add_argument("--tls", action="store_true", help="TLS with a throw-away CA, and SuperNode authentication")
    parser.add_argument("--port", type=int, default=39100, help="the SuperLink's port; SuperNodes take the next N")
    parser.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round waits for its replies")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint "
                        "(not with client state kept on the nodes)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads each ServerApp and ClientApp computes "
                        "with (default: the cores shared by the SuperNodes a round keeps busy, at least 1); the run "
                        "equals a simulation with torch.set_num_threads(this)")
    args = parser.parse_args(argv)
    try:
        return launch(args)
    except LaunchError as error:
        print(f"python -m fedgan.flower: {error}", file=sys.stderr)
        return 2


def taken(out: Path) -> str:
    """What says a run has used the folder `out` (its config, history or final model), or ''."""
    return next((name for name in ("config.json", "history.json", "final.pt") if (out / name).exists()), "")


def launch(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    check_plan(config, args.supernodes)
    if args.threads is not None and args.threads < 1:
        raise LaunchError(f"--threads {args.threads}: a number of threads >= 1")
    out = args.out.resolve()
    if (out / "final.pt").exists():
        raise LaunchError(f"--out {out} holds a finished run (final.pt); choose another folder")
    used = taken(out)
    if used and not args.resume:
        raise LaunchError(f"--out {out} holds a run already ({used}): --resume continues it, or choose "
                          "another folder")
    if args.resume:
        try:
            RemoteFederation.check_resumable(config)
        except ValueError as error:
            raise LaunchError(str(error)) from error
        if (out / "config.json").exists():
            saved = FedConfig.from_json((out / "config.json").read_text())
            may_change = saved.resume_may_change
            if dataclasses.replace(saved, **{f: getattr(config, f) for f in may_change}) != config:
                raise LaunchError(f"--resume: --config differs from the run's {out / 'config.json'} in more than "
                                  f"{' and '.join(may_change)}")
    ports = [args.port + i for i in range(args.supernodes + 1)]
    check_ports(ports)
    folder = out / "flower"
    folder.mkdir(parents=True, exist_ok=True)
    try:  # the folder's claim: a launcher started into it at the same moment finds it taken
        with open(out / "config.json", "w" if args.resume else "x") as file:
            file.write(config.to_json())
    except FileExistsError:
        raise LaunchError(f"--out {out} holds a run already (config.json): --resume continues it, or choose "
                          "another folder") from None
    bin_dir = Path(sys.executable).parent
    package_root = str(Path(fedgan.__file__).resolve().parents[1])
    env = {**os.environ, **QUIET, **POLL, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    link = [str(bin_dir / "flower-superlink"), "--host", HOST, "--port", str(ports[0]),
            "--disable-runtime-dependency-installation"]
    node_flags: list[str] = ["--insecure"]
    cli_connection = f'address = "{HOST}:{ports[0]}"\ninsecure = true\n'
    if args.tls:
        tls = make_tls_files(folder / "certs")
        link += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile",
                 str(tls["key"]), "--enable-supernode-auth"]
        node_flags = ["--root-certificates", str(tls["ca"])]
        cli_connection = f'address = "{HOST}:{ports[0]}"\nroot-certificates = "{tls["ca"]}"\n'
    else:
        link.append("--insecure")
    cli_home = folder / "cli"
    cli_home.mkdir(parents=True, exist_ok=True)
    (cli_home / "config.toml").write_text(f'[superlink]\ndefault = "{FEDERATION}"\n\n'
                                          f'[superlink.{FEDERATION}]\n{cli_connection}')
    cli_env = {**env, "FLWR_HOME": str(cli_home)}
    processes = Processes(folder, env)
    # The nodes share this machine's cores: more threads than cores between them slows each of them down (2-3x
    # measured on 2 cores). The thread count also orders float reductions, so the run equals a simulation at it.
    busy = min(args.supernodes, clients_per_round(config.num_clients, config.client_fraction))
    threads = args.threads or max(1, (os.cpu_count() or 1) // busy)
    interrupted = False

    def on_term(signum, frame):  # a TERM to the launcher tears down as Ctrl-C does
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term)
    started, run_id = time.perf_counter(), None
    try:
        processes.start("superlink", link, folder / "superlink", threads)  # its ServerApp: same arithmetic
        wait_until(lambda: _listening(ports[0]), 60, "the SuperLink did not start", processes)
        for i in range(args.supernodes):
            flags = list(node_flags)
            if args.tls:  # a key pair a node, its public key registered with the SuperLink before it connects
                private, public = make_node_key(folder / "keys", f"node{i}")
                registered = flwr_cli(["supernode", "register", str(public), FEDERATION], cli_env)
                if registered.returncode:
                    raise LaunchError(f"registering node{i}'s key failed: {registered.stdout[-500:]}"
                                      f"{registered.stderr[-500:]}")
                flags += ["--auth-supernode-private-key", str(private)]
            processes.start(f"supernode{i}", [str(bin_dir / "flower-supernode"), *flags, "--superlink",
                                              f"{HOST}:{ports[0]}", "--host", HOST, "--port", str(ports[1 + i]),
                                              "--node-config", f"partition-id={i} num-partitions={args.supernodes}"],
                            folder / f"supernode{i}", threads)
        run_config = (f"config-file='{out / 'config.json'}' out-dir='{out}' supernodes={args.supernodes} "
                      f"round-timeout={args.round_timeout} resume={str(args.resume).lower()}")
        submitted = flwr_cli(["run", str(APP_DIR), FEDERATION, "--format", "json", "--run-config", run_config],
                             cli_env)
        try:
            run_id = json.loads(submitted.stdout)["run-id"]
        except (json.JSONDecodeError, KeyError) as error:
            raise LaunchError(f"flwr run did not start the run: {submitted.stdout[-800:]}{submitted.stderr[-800:]}"
                              ) from error
        print(f"run {run_id}: {args.supernodes} SuperNodes, {config.rounds} rounds; logs in {folder}", flush=True)
        status = wait_for_run(run_id, cli_env, processes)
    except KeyboardInterrupt:
        interrupted = True
        status = {"status": "interrupted", "status-details": "the launcher was interrupted"}
    finally:
        if run_id is not None:  # the ServerApp's output, which only the SuperLink has
            try:
                log = flwr_cli(["log", str(run_id), FEDERATION, "--show"], cli_env, timeout=30)
                (folder / "serverapp.log").write_text(log.stdout + log.stderr)
            except (subprocess.TimeoutExpired, OSError):
                pass
        died = processes.died()
        processes.stop()
        signal.signal(signal.SIGTERM, previous)
    seconds = time.perf_counter() - started
    return report(out, config, status, died, seconds, interrupted, threads)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((HOST, port)) == 0


def wait_for_run(run_id: int, env: dict[str, str], processes: Processes) -> dict:
    """Poll the run's status until it has finished; its last `flwr ls` record."""
    while True:
        listed = flwr_cli(["ls", FEDERATION, "--run-id", str(run_id), "--format", "json"], env, timeout=60)
        try:
            record = json.loads(listed.stdout)["runs"][0]
        except (json.JSONDecodeError, KeyError, IndexError):
            record = {}
        processes.survey()
        if str(record.get("status", "")).startswith("finished"):
            return record
        if "superlink" in processes.died():
            return {"status": "superlink died", "status-details": f"exit code {processes.died()['superlink']}"}
        time.sleep(1.0)


def report(out: Path, config: FedConfig, status: dict, died: dict[str, int], seconds: float,
           interrupted: bool, threads: int) -> int:
    """Say how the run ended; 0 only for a completed run that lost nothing, with its final.pt."""
    problems = []
    if status.get("status") != "finished:completed":
        problems.append(f"the run's status is {status.get('status')!r} ({status.get('status-details', '')})")
    history = json.loads((out / "history.json").read_text()) if (out / "history.json").exists() else []
    lost = {r["round"]: r["failed"] for r in history if r.get("failed")}
    if lost:
        problems.append("rounds lost results: " + "; ".join(
            f"round {r}: clients {sorted(int(c) for c in f)} ({next(iter(f.values()))})" for r, f in lost.items()))
    if len(history) < config.rounds:
        problems.append(f"{len(history)} of {config.rounds} rounds done")
    if not (out / "final.pt").exists():
        problems.append("no final.pt was written")
    if died:
        problems.append("processes died during the run: " + ", ".join(f"{n} (exit {c})" for n, c in died.items()))
    summary = {"status": status.get("status"), "rounds": len(history), "seconds": round(seconds, 1),
               "threads_per_supernode": threads,
               "lost": {str(k): v for k, v in lost.items()}, "died": died, "problems": problems}
    (out / "launch.json").write_text(json.dumps(summary, indent=1))
    if not problems:
        print(f"done in {seconds:.0f} s: {out / 'final.pt'}, {out / 'history.json'}")
        return 0
    print("python -m fedgan.flower: the run did not succeed:\n  " + "\n  ".join(problems), file=sys.stderr)
    return 130 if interrupted else 1
