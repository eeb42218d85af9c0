"""The ClientApp: a SuperNode trains the clients it holds, one message a client and round.

A node's config names its share of the clients: `partition-id` j of `num-partitions` N holds the clients c with
c % N == j (with one node a client, just client j). It reads its data where the simulation would ($FEDGAN_DATA or
the config's data_root, on the node), partitions it with the run's seed, and trains through node.NodeClients.

Flower 1.42 runs each message in a fresh ClientApp process, so this module imports only flwr: a query's process
answers without importing torch (seconds a node on a small machine); a train message imports the rest.
"""
from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def hosted_by(client: int, partition_id: int, num_partitions: int) -> bool:
    """Whether the node of `partition_id` (of `num_partitions`) holds `client`."""
    return client % num_partitions == partition_id


def node_partition(context: Context) -> tuple[int, int]:
    """The node's (partition-id, num-partitions), checked."""
    try:
        partition_id, count = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except (KeyError, ValueError) as error:
        raise ValueError("a fedgan SuperNode needs --node-config 'partition-id=J num-partitions=N' (integers), got "
                         f"{dict(context.node_config)}") from error
    if not 0 <= partition_id < count:
        raise ValueError(f"partition-id={partition_id} is not in 0..{count - 1} (num-partitions={count})")
    return partition_id, count


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The node's partition, so the server can send each client's task to the node that holds it."""
    partition_id, count = node_partition(context)
    return Message(RecordDict({"node": ConfigRecord({"partition-id": partition_id, "num-partitions": count})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One client's round: local training from the global states the message carries, and its upload."""
    from fedgan.config import FedConfig  # the training's imports (torch): see the module's docstring
    from fedgan.flower.messages import NodeStore, read_task, upload_record
    from fedgan.flower.node import NodeClients

    task, config_json, global_states = read_task(msg.content)
    partition_id, count = node_partition(context)
    if not hosted_by(task.client, partition_id, count):
        raise ValueError(f"client {task.client} is not held by this node (partition-id={partition_id} of {count})")
    upload = NodeClients(FedConfig.from_json(config_json)).train(task, global_states, NodeStore(context.state))
    return Message(upload_record(task.client, upload), reply_to=msg)
