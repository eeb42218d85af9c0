"""The Flower App (fedgan/flower/): its clients' and server's arithmetic against the simulation, first in one process
through the real Flower records, then on a real SuperLink and SuperNodes on loopback (test_flower_deployment.py)."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

import fedgan_utils as fu
from fedgan.gan import generator_steps
from fedgan.flower.messages import NodeStore, read_task, read_upload, task_record, upload_record
from fedgan.flower.node import NodeClients
from fedgan.flower.remote import RemoteFederation
from fedgan.uploads import uses_error_feedback

pytest.importorskip("flwr")  # an optional extra; the test requirements install it
from flwr.app import RecordDict  # noqa: E402

CASES = {  # the configs the deployment is checked on, and the pipeline's other paths
    "fedavg_iid": {},
    "dirichlet_fedadam": dict(partition="dirichlet", alpha=0.3, strategy="fedadam"),
    "adam_state_kept": dict(optimizer_state="keep"),
    "fedbn": dict(bn_policy="local"),
    "dp_fedavg": dict(dp_clip=1.0, dp_noise_multiplier=0.5),
    "dp_fedavg_gan": dict(gan_layout="server_g", dp_clip=1.0, dp_noise_multiplier=0.5),
    "dp_int8": dict(dp_clip=1.0, dp_noise_multiplier=0.5, compression="int8"),  # updates sent, noised key by key
    "topk_error_feedback": dict(compression="topk", topk_fraction=0.1, error_feedback=True),
    "int8": dict(compression="int8"),
    "sign_flip_median": dict(attack="sign_flip", attack_fraction=0.34, strategy="median"),
    "sign_flip_not_every_round": dict(attack="sign_flip", attack_fraction=0.34, client_fraction=0.67),  # honest rounds
    "nan_attacker": dict(attack="nan", attack_fraction=0.34),  # left out: the others' values count as trained
    "label_flip": dict(attack="label_flip", attack_fraction=0.34),
    "two_of_three_stratified": dict(client_fraction=0.67, selection="stratified"),
    "fedprox_deadline": dict(prox_mu=0.1, client_speed_sigma=0.5, round_deadline=2.5),
    "spectral_instance_noise": dict(d_norm="spectral", instance_noise=0.2),  # the node draws its row of the noise
}


def message_send(config, data, nodes=2):
    """RemoteFederation's `send` through the real Flower records: each task encoded, decoded on its "node" (one
    NodeClients and one Context.state a node), trained, its upload encoded and decoded."""
    node = NodeClients(config, data=data)
    states = {j: RecordDict() for j in range(nodes)}

    def send(tasks, global_states):
        replies = {}
        for task in tasks:
            task_back, config_json, states_back = read_task(task_record(task, config.to_json(), global_states))
            assert task_back == task and config_json == config.to_json()
            upload = node.train(task_back, states_back, NodeStore(states[task.client % nodes]))
            client, replies[task.client] = read_upload(upload_record(task.client, upload))
            assert client == task.client
        return replies
    send.states = states
    return send


def assert_same_run(simulated, remote):
    for name, model in (("generator", "generator"), ("discriminator", "discriminator")):
        for (key, a), (_, b) in zip(getattr(simulated, model).state_dict().items(),
                                    getattr(remote, model).state_dict().items()):
            assert torch.equal(a, b), f"{name} {key}: largest difference {(a.double() - b.double()).abs().max()}"
    for a, b in zip(simulated.history, remote.history, strict=True):
        for key in ("clients", "d_loss_clients", "g_loss_clients", "images_total", "bytes_up", "bytes_down",
                    "dropped_out", "late", "excluded", "server_g_loss"):
            assert a.get(key) == b.get(key), (a["round"], key, a.get(key), b.get(key))


@pytest.mark.parametrize("case", CASES)
def test_a_federation_of_remote_clients_computes_the_simulation_bit_for_bit(mnist_small, tiny_config, case):
    config = tiny_config(rounds=2, **CASES[case])
    simulated = fu.Federation(config, data=mnist_small, log=False).run(progress=False)
    send = message_send(config, mnist_small)
    remote = RemoteFederation(dataclasses.replace(config, run_name="remote"), send, data=mnist_small,
                              log=False).run(progress=False)
    assert_same_run(simulated, remote)
    kept = {key for state in send.states.values() for key in state}  # what stayed on the nodes between rounds
    if config.optimizer_state == "keep":
        assert {f"fedgan.{c}.{w}_opt" for c in range(3) for w in "gd"} <= kept
    if uses_error_feedback(config):
        assert {f"fedgan.{c}.{w}_residual" for c in range(3) for w in "gd"} <= kept
    if config.bn_policy == "local":
        assert {f"fedgan.{c}.d_local" for c in range(3)} <= kept
    if not (config.optimizer_state == "keep" or uses_error_feedback(config) or config.bn_policy == "local"):
        assert not kept
    assert all(r["wire_bytes_down"] >= r["bytes_down"] for r in remote.history)


def test_a_lost_client_is_left_out_of_its_round_and_said_so(mnist_small, tiny_config, capsys):
    config = tiny_config(rounds=2, min_clients=1)
    send = message_send(config, mnist_small)

    def lossy(tasks, states):  # client 1's node is gone in round 2
        replies = send(tasks, states)
        if tasks[0].round == 2:
            replies[1] = "node 7: node unavailable"
        return replies
    remote = RemoteFederation(config, lossy, data=mnist_small).run(progress=False)
    assert "failed" not in remote.history[0]
    assert remote.history[1]["clients"] == [0, 2] and remote.history[1]["failed"] == {1: "node 7: node unavailable"}
    assert "left out clients [1] (node 7: node unavailable); 2 of 3 replied" in capsys.readouterr().out


def test_a_round_with_no_replies_keeps_the_global_models(mnist_small, tiny_config):
    config = tiny_config(rounds=2)
    send = message_send(config, mnist_small)
    remote = RemoteFederation(config, lambda tasks, states: ({} if tasks[0].round == 2 else send(tasks, states)),
                              data=mnist_small, log=False)
    remote.run_round()
    before = {k: v.clone() for k, v in remote.generator.state_dict().items()}
    record = remote.run_round()
    assert record["clients"] == [] and sorted(record["failed"]) == [0, 1, 2] and np.isnan(record["d_loss"])
    assert all(torch.equal(v, before[k]) for k, v in remote.generator.state_dict().items())


@pytest.mark.parametrize("fields, match", [(dict(sync_mode="async"), "synchronous rounds only"),
                                           (dict(sync_networks="d"), "synchronises both networks"),
                                           (dict(gan_layout="ua_gan"), "run in the simulation"),
                                           (dict(strategy="scaffold"), "not sent in Flower messages yet")])
def test_what_a_flower_run_does_not_do_is_a_clear_error(mnist_small, tiny_config, fields, match):
    with pytest.raises(ValueError, match=match):
        RemoteFederation(tiny_config(**fields), lambda tasks, states: {}, data=mnist_small, log=False)


def replies_of(states, sizes):
    """Hand-made train replies: each client's state and its number of examples, as a ClientApp returns them."""
    from flwr.app import ArrayRecord, Metadata, MetricRecord
    from flwr.app.message.message import make_message  # a reply as the SuperLink hands it over (no run here)
    replies = []
    for node, (state, size) in enumerate(zip(states, sizes), start=1):
        metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                            reply_to_message_id=f"task-{node}", group_id="1", created_at=0.0, ttl=60.0,
                            message_type="train")
        replies.append(make_message(metadata, RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(
            {"num-examples": size})})))
    return replies


def test_fedgan_strategy_with_fedavg_is_flowers_fedavg_and_with_the_median_the_median():
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

    from fedgan.flower.strategies import FedGanStrategy
    global_state = {"w": torch.zeros(3), "b": torch.zeros(2)}
    states = [{"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.0, 1.0])},
              {"w": torch.tensor([5.0, 0.0, 1.0]), "b": torch.tensor([2.0, 2.0])},
              {"w": torch.tensor([1000.0, 1.0, 2.0]), "b": torch.tensor([4.0, 3.0])}]  # an outlier
    ours = FedGanStrategy(fu.FedAvg())
    ours.global_state = global_state
    theirs, _ = FlowerFedAvg().aggregate_train(1, replies_of(states, [10, 20, 30]))
    mine, _ = ours.aggregate_train(1, replies_of(states, [10, 20, 30]))
    for key in global_state:
        torch.testing.assert_close(mine[key].numpy(), theirs[key].numpy())
    median = FedGanStrategy(fu.RobustRule(fu.median))
    median.global_state = global_state
    result, _ = median.aggregate_train(1, replies_of(states, [10, 20, 30]))
    assert result["w"].numpy().tolist() == [5.0, 1.0, 2.0] and result["b"].numpy().tolist() == [2.0, 2.0]


def test_fedgan_strategy_averages_the_buffers_it_is_told_of_as_the_simulation_does():
    """FedAdam steps on parameters; a BatchNorm running variance is plain-averaged (a server step would move it
    off the clients' values, and could take a variance below 0)."""
    from fedgan.flower.strategies import FedGanStrategy
    from fedgan.strategies import bound_copy
    global_state = {"w": torch.zeros(2), "bn.running_var": torch.full((2,), 1e-3)}
    states = [{"w": torch.tensor([1.0, 2.0]), "bn.running_var": torch.full((2,), 5e-4)}] * 2
    told = FedGanStrategy(fu.ServerOptimizer("fedadam", server_lr=0.01), buffer_keys={"bn.running_var"})
    told.global_state = global_state
    result, _ = told.aggregate_train(1, replies_of(states, [1, 1]))
    assert torch.equal(torch.from_numpy(result["bn.running_var"].numpy()), states[0]["bn.running_var"])
    simulated = bound_copy(fu.ServerOptimizer("fedadam", server_lr=0.01), {"bn.running_var"})
    expected = simulated.aggregate(global_state, {k: torch.stack([s[k] for s in states]) for k in states[0]}, [1, 1])
    torch.testing.assert_close(torch.from_numpy(result["w"].numpy()), expected["w"])
    untold = FedGanStrategy(fu.ServerOptimizer("fedadam", server_lr=0.01))
    untold.global_state = global_state
    stepped, _ = untold.aggregate_train(1, replies_of(states, [1, 1]))
    assert not torch.equal(torch.from_numpy(stepped["bn.running_var"].numpy()), states[0]["bn.running_var"])


def test_fedgan_strategy_with_dp_clips_each_update_and_divides_by_the_expected_clients():
    from fedgan.flower.strategies import FedGanStrategy
    strategy = FedGanStrategy(fu.FedAvg(), dp_clip=1.0, dp_noise_multiplier=0.0, expected_clients=4)
    strategy.global_state = {"w": torch.zeros(2)}
    states = [{"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([0.0, 0.5])}]  # norms 3 (clipped to 1) and 0.5
    result, _ = strategy.aggregate_train(1, replies_of(states, [1, 1]))
    assert result["w"].numpy().tolist() == [1.0 / 4, 0.5 / 4]
    strategy.global_state = {"bn.running_var": torch.zeros(2)}  # a noisy variance is clamped at 0, as in simulation
    result, _ = strategy.aggregate_train(1, replies_of([{"bn.running_var": torch.tensor([-0.5, 0.5])}] * 2, [1, 1]))
    assert result["bn.running_var"].numpy().tolist() == [0.0, 0.25]
    with pytest.raises(ValueError, match="expected_clients"):
        FedGanStrategy(fu.FedAvg(), dp_clip=1.0)


def test_dp_fedavg_gan_strategy_aggregates_d_and_trains_g_against_it(tiny_config):
    from fedgan.flower.strategies import DPFedAvgGAN
    config = tiny_config()
    torch.manual_seed(0)
    generator, discriminator = fu.build_models(config)
    reference_g = copy.deepcopy(generator)
    strategy = DPFedAvgGAN(fu.FedAvg(), generator, discriminator, num_classes=10, generator_steps=2, batch_size=4,
                           seed=3)
    start = strategy.global_arrays()
    assert {k.split(".")[0] for k in start} == {"generator", "discriminator"}
    strategy.global_state = dict(start.to_torch_state_dict())
    strategy.global_state = {k[len("discriminator."):]: v for k, v in strategy.global_state.items()
                             if k.startswith("discriminator.")}
    clients = [{k: v + 0.01 * (i + 1) if v.dtype.is_floating_point else v
                for k, v in discriminator.state_dict().items()} for i in range(2)]
    arrays, _ = strategy.aggregate_train(1, replies_of(clients, [1, 3]))
    state = arrays.to_torch_state_dict()
    expected_d = fu.fedavg_stacked({k: torch.stack([c[k] for c in clients]) for k in clients[0]}, np.array([1, 3]))
    for key, value in expected_d.items():
        assert torch.equal(state[f"discriminator.{key}"], value), key
    critic = copy.deepcopy(discriminator)
    critic.load_state_dict(expected_d)
    optimizer = torch.optim.Adam(reference_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    loss = generator_steps(reference_g, critic.train().requires_grad_(False), optimizer, steps=2, batch_size=4,
                              num_classes=10, draws=torch.Generator().manual_seed(3))
    assert loss == strategy.last_generator_loss
    for key, value in reference_g.state_dict().items():
        assert torch.equal(state[f"generator.{key}"], value), key



def test_a_remote_federation_resumes_from_its_checkpoint_as_the_simulation_does(mnist_small, tiny_config):
    config = tiny_config(rounds=1, checkpoint_every=1, run_name="remote")
    RemoteFederation(config, message_send(config, mnist_small), data=mnist_small, log=False).run(progress=False)
    longer = dataclasses.replace(config, rounds=2)
    resumed = RemoteFederation(longer, message_send(longer, mnist_small), data=mnist_small, resume=True,
                               log=False).run(progress=False)
    straight = fu.Federation(dataclasses.replace(longer, run_name="straight"), data=mnist_small,
                             log=False).run(progress=False)
    assert [r["round"] for r in resumed.history] == [1, 2]
    assert_same_run(straight, resumed)
    with pytest.raises(ValueError, match="that state is on the nodes"):
        RemoteFederation(dataclasses.replace(longer, optimizer_state="keep"), message_send(longer, mnist_small),
                         data=mnist_small, resume=True, log=False)


def test_private_keys_are_readable_by_their_owner_only(tmp_path):
    from fedgan.flower.certificates import make_node_key, make_tls_files
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "server.key").write_text("an older key")  # written over, its wider mode not kept
    (tmp_path / "tls" / "server.key").chmod(0o644)
    files = make_tls_files(tmp_path / "tls")
    private, public = make_node_key(tmp_path / "keys", "node0")
    assert (files["key"].stat().st_mode & 0o777) == (private.stat().st_mode & 0o777) == 0o600
    assert b"PRIVATE KEY" in files["key"].read_bytes() and public.read_text().startswith("ecdsa-sha2")


def test_the_server_app_writes_nothing_into_a_folder_that_holds_a_run(tmp_path):
    """`flwr run` by hand with the out-dir of an earlier run: refused before anything is written there."""
    from flwr.app import Context, RecordDict

    from fedgan.flower import server_app
    (tmp_path / "history.json").write_text("[the earlier run's]")
    run = {"out-dir": str(tmp_path), "config-file": str(tmp_path / "config.json"), "resume": False, "supernodes": 2,
           "node-timeout": 1.0, "round-timeout": 1.0}
    with pytest.raises(RuntimeError, match="holds a run already"):
        server_app.main(None, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]
    assert (tmp_path / "history.json").read_text() == "[the earlier run's]"
