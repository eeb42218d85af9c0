"""What travels between the ServerApp and the ClientApps: tasks, global states and uploads as Flower records.

Tensors travel as ArrayRecords (numpy's .npy bytes: bit for bit); the task and the losses as Config and Metric
records. Also the node's client store kept in Context.state, one ArrayRecord a (client, name).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, MutableMapping

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedgan.flower.node import NETWORKS, State, Task, Upload

def task_record(task: Task, config_json: str, global_states: dict[str, State]) -> RecordDict:
    """A task for one client, with the run's config and the global G and D."""
    return RecordDict({"task": ConfigRecord({"config": config_json, **dataclasses.asdict(task)}),
                       **{which: ArrayRecord(global_states[which]) for which in NETWORKS}})


def read_task(content: RecordDict) -> tuple[Task, str, dict[str, State]]:
    """task_record's inverse: the task, the config's JSON and the global states."""
    fields = dict(content["task"])
    config_json = fields.pop("config")
    task = Task(**{f.name: int(fields[f.name]) for f in dataclasses.fields(Task)})
    return task, config_json, {which: dict(content[which].to_torch_state_dict()) for which in NETWORKS}


def upload_record(client: int, upload: Upload) -> RecordDict:
    """A client's upload: its values and updates per network, its losses, size and counted bytes."""
    metrics = {"client": client, "d_loss": upload.d_loss, "g_loss": upload.g_loss, "size": upload.size,
               **{f"{which}_bytes_up": upload.bytes_up.get(which, 0) for which in NETWORKS}}
    return RecordDict({"metrics": MetricRecord(metrics),
                       **{f"{which}.values": ArrayRecord(upload.values[which]) for which in NETWORKS},
                       **{f"{which}.updates": ArrayRecord(upload.updates[which]) for which in upload.updates}})


def read_upload(content: RecordDict) -> tuple[int, Upload]:
    """upload_record's inverse: the client and its Upload."""
    metrics = content["metrics"]

    def trees(part: str) -> dict[str, State]:
        return {which: dict(content[f"{which}.{part}"].to_torch_state_dict()) for which in NETWORKS
                if f"{which}.{part}" in content}
    upload = Upload(trees("values"), trees("updates"), float(metrics["d_loss"]), float(metrics["g_loss"]),
                    int(metrics["size"]), {which: int(metrics[f"{which}_bytes_up"]) for which in NETWORKS})
    return int(metrics["client"]), upload


def record_bytes(content: RecordDict) -> int:
    """The bytes of a message's arrays (their .npy encodings), what dominates what it puts on the wire."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())


class NodeStore(MutableMapping[str, State]):
    """A node's client store (node.NodeClients) kept in the ClientApp's Context.state: it stays on the node, from
    round to round of a run."""

    PREFIX = "fedgan."

    def __init__(self, state: RecordDict):
        self.state = state

    def __getitem__(self, key: str) -> State:
        return dict(self.state[self.PREFIX + key].to_torch_state_dict())  # fresh tensors, decoded each time

    def __setitem__(self, key: str, value: State) -> None:
        self.state[self.PREFIX + key] = ArrayRecord({k: v.detach().cpu() for k, v in value.items()})

    def __delitem__(self, key: str) -> None:
        del self.state[self.PREFIX + key]

    def __iter__(self) -> Iterator[str]:
        return (k[len(self.PREFIX):] for k in list(self.state) if k.startswith(self.PREFIX))

    def __len__(self) -> int:
        return sum(1 for _ in self)

