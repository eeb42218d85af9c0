"""The ServerApp: the federation of a FedConfig run by RemoteFederation, its clients' rounds sent to SuperNodes.

Run config (pyproject.toml's [tool.flwr.app.config], or `flwr run --run-config`): `config-file`, the FedConfig's
JSON on the server; `out-dir`, where final.pt, history.json and the checkpoints go; `supernodes`, the nodes to wait
for; `round-timeout`, how long a round waits for its replies (seconds); `node-timeout`, how long to wait for the
nodes to connect; `resume`, whether to continue the newest run in out-dir/checkpoints (as the simulation's
resume=True does).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Mapping

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedgan.checkpoints import plain
from fedgan.config import FedConfig
from fedgan.federation import format_round
from fedgan.flower.messages import read_upload, record_bytes, task_record
from fedgan.flower.node import State, Task, Upload
from fedgan.flower.remote import RemoteFederation

app = ServerApp()


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The ids of `count` connected SuperNodes; a clear error if fewer connect within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(nodes)} of the {count} SuperNodes connected within {timeout:.0f} s")
        time.sleep(0.2)
    return nodes


def node_partitions(grid: Grid, nodes: list[int], count: int, timeout: float) -> dict[int, int]:
    """partition-id -> node id: every node asked for its partition; each of 0..count-1 held exactly once."""
    asked = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    replies = list(grid.send_and_receive(asked, timeout=timeout))
    held: dict[int, int] = {}
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"SuperNode {reply.metadata.src_node_id} refused to say its partition: "
                               f"{reply.error.reason}")
        partition = reply.content["node"]
        if int(partition["num-partitions"]) != count:
            raise RuntimeError(f"SuperNode {reply.metadata.src_node_id} has num-partitions="
                               f"{partition['num-partitions']}, the run expects {count}")
        if int(partition["partition-id"]) in held:
            raise RuntimeError(f"two SuperNodes hold partition-id={partition['partition-id']}")
        held[int(partition["partition-id"])] = reply.metadata.src_node_id
    missing = sorted(set(range(count)) - set(held))
    if missing:
        raise RuntimeError(f"no SuperNode answered for partition-ids {missing} within {timeout:.0f} s")
    return held


class GridSend:
    """RemoteFederation's `send` over a Flower Grid: a round's tasks to the nodes that hold the clients, replies
    matched back to their clients; an error reply or none within the timeout is a lost client, said why."""

    def __init__(self, grid: Grid, config: FedConfig, nodes: Mapping[int, int], timeout: float):
        self.grid, self.config_json, self.nodes, self.timeout = grid, config.to_json(), nodes, timeout
        self.wire = {"up": 0, "down": 0}  # the last round's arrays' bytes, each way

    def node_of(self, client: int) -> int:
        return self.nodes[client % len(self.nodes)]

    def __call__(self, tasks: list[Task], global_states: dict[str, State]) -> dict[int, Upload | str]:
        messages = [Message(task_record(task, self.config_json, global_states), dst_node_id=self.node_of(task.client),
                            message_type=MessageType.TRAIN, ttl=self.timeout)  # a lost task expires with its round
                    for task in tasks]
        self.wire = {"down": sum(record_bytes(m.content) for m in messages), "up": 0}
        ids = self.grid.push_messages(messages)
        client_of = dict(zip(ids, (task.client for task in tasks)))
        results: dict[int, Upload | str] = {}
        deadline = time.monotonic() + self.timeout
        while len(results) < len(tasks) and time.monotonic() < deadline:
            for reply in self.grid.pull_messages([i for i, c in client_of.items() if c not in results]):
                client = client_of[reply.metadata.reply_to_message_id]
                if reply.has_error():
                    results[client] = (f"node {self.node_of(client)}: {reply.error.reason} "
                                       f"(error code {reply.error.code})")
                    continue
                self.wire["up"] += record_bytes(reply.content)
                results[client] = read_upload(reply.content)[1]
            time.sleep(0.25)  # each pull is a request the SuperLink serves: not too often
        for task in tasks:
            results.setdefault(task.client, f"no reply from node {self.node_of(task.client)} within "
                                            f"{self.timeout:.0f} s")
        return results


def write_history(path: Path, history: list) -> None:
    """history.json: the run's records, NaN as null (JSON has no NaN)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value.tolist() if hasattr(value, "tolist") else value
    temporary = path.with_suffix(".partial")
    temporary.write_text(json.dumps(clean(plain(history)), indent=1))
    temporary.replace(path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation of the run config's FedConfig on the connected SuperNodes."""
    run = context.run_config
    out = Path(str(run["out-dir"]))
    if (out / "final.pt").exists() or ((out / "history.json").exists() and not bool(run["resume"])):
        raise RuntimeError(f"out-dir {out} holds a run already (final.pt or history.json); choose another folder, "
                           "or resume=true to continue an unfinished run")  # `flwr run` by hand: nothing written over
    config = FedConfig.from_json(Path(str(run["config-file"])).read_text())
    config = dataclasses.replace(config, checkpoint_dir=str(out / "checkpoints"), out_dir=str(out / "outputs"))
    count = int(run["supernodes"])
    nodes = wait_for_nodes(grid, count, float(run["node-timeout"]))
    held = node_partitions(grid, nodes, count, float(run["node-timeout"]))
    send = GridSend(grid, config, held, float(run["round-timeout"]))
    federation = RemoteFederation(config, send, resume=bool(run["resume"]), log=True)
    with open(out / "server.log", "a") as log:
        print(f"{count} SuperNodes: partition -> node {held}", file=log, flush=True)
        while federation.round < config.rounds:
            record = federation.run_round()
            write_history(out / "history.json", federation.history)
            print(format_round(record) + (f" | lost {sorted(record['failed'])}" if record.get("failed") else ""),
                  file=log, flush=True)
    final = out / "final.pt"
    federation.save_checkpoint(final)
