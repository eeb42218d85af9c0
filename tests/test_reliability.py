"""Faults a run survives: checksummed checkpoints and fallback, kill-and-resume, NaN and failing clients, the
watchdog, attackers, and weights_only loading everywhere."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fedgan_utils as fu
from helpers import states_equal


def test_a_client_sending_nan_is_left_out_and_the_run_goes_on(mnist_small, tiny_config):
    config = tiny_config(attack="nan", attack_fraction=0.34, rounds=2)
    federation = fu.Federation(config, data=mnist_small, log=False)
    assert len(federation.attackers) == 1
    federation.run(progress=False)
    assert all(r["excluded"] == federation.attackers for r in federation.history)
    assert all(torch.isfinite(v).all() for v in federation.generator.state_dict().values() if v.is_floating_point())
    assert np.isfinite(federation.history[-1]["d_loss"])


def test_too_few_usable_updates_keep_the_global_model(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(attack="nan", attack_fraction=0.34, min_clients=3), data=mnist_small,
                               log=False)
    before = {k: v.clone() for k, v in federation.discriminator.state_dict().items()}
    record = federation.run_round()
    assert record["kept_global"] and states_equal(federation.discriminator.state_dict(), before)
    # Krum assuming 2 of 3 clients faulty needs 3 updates: with a NaN attacker's left out, the round keeps the
    # global model instead of stopping the run
    krum = fu.Federation(tiny_config(strategy="krum", krum_f=2, attack="nan", attack_fraction=0.34, run_name="krum"),
                         data=mnist_small, log=False)
    assert krum.config.updates_needed == 3
    assert krum.run_round()["kept_global"] and krum.round == 1


def test_sign_flip_attackers_drag_fedavg_but_not_the_median(mnist_small, tiny_config, tmp_path):
    config = dict(num_clients=5, attack="sign_flip", attack_fraction=0.4, attack_scale=10.0, rounds=1)
    honest_run = fu.Federation(tiny_config(num_clients=5, rounds=1, checkpoint_dir=str(tmp_path / "h")),
                               data=mnist_small, log=False)
    honest_start = {k: v.clone() for k, v in honest_run.generator.state_dict().items()}
    honest_run.run_round()
    distances = {}
    for strategy in ("fedavg", "median"):
        run = fu.Federation(tiny_config(**config, strategy=strategy, checkpoint_dir=str(tmp_path / strategy)),
                            data=mnist_small, log=False)
        run.run_round()
        distances[strategy] = sum((run.generator.state_dict()[k] - honest_run.generator.state_dict()[k]).norm()
                                  for k in honest_start if honest_start[k].is_floating_point())
    assert distances["median"] < distances["fedavg"] / 3


def test_label_flip_poisons_only_the_attackers_training_labels(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(attack="label_flip", attack_fraction=0.34), data=mnist_small, log=False)
    (attacker,) = federation.attackers
    own = torch.as_tensor(federation.parts[attacker])
    assert torch.equal(federation.client_labels[own], 9 - federation.labels[own])
    others = torch.as_tensor(np.concatenate([federation.parts[c] for c in range(3) if c != attacker]))
    assert torch.equal(federation.client_labels[others], federation.labels[others])
    assert torch.equal(federation.labels, mnist_small[1])  # the clean labels stay for evaluation


def test_the_watchdog_stops_a_run_whose_discriminator_loss_collapsed(mnist_small, tiny_config):
    # collapse_loss above any real loss: every round counts as collapsed, so the third one stops the run
    federation = fu.Federation(tiny_config(rounds=5, watchdog_rounds=3, collapse_loss=100.0), data=mnist_small,
                               log=False)
    with pytest.raises(fu.DivergenceError, match=r"round 3: the discriminator loss stayed below collapse_loss=100.0"):
        federation.run(progress=False)
    assert len(federation.history) == 2 and "round_0002.pt" in str(fu.latest_checkpoint(federation.run_dir))
    # the round that stopped it is undone: the run stands at round 2 as its checkpoint and history have it
    saved = fu.load_checkpoint(fu.latest_checkpoint(federation.run_dir))
    assert federation.round == 2 and federation.clock == federation.history[-1]["sim_time_total"]
    assert states_equal(federation.generator.state_dict(), saved["generator"])


def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one_and_the_run_ends_the_same(
        mnist_small, tiny_config, tmp_path):
    straight = fu.run_federation(tiny_config(rounds=4, checkpoint_dir=str(tmp_path / "a")), data=mnist_small,
                                 progress=False)
    broken = fu.run_federation(tiny_config(rounds=3, checkpoint_dir=str(tmp_path / "b")), data=mnist_small,
                               progress=False)
    latest = fu.latest_checkpoint(broken.run_dir)
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a torn write
    assert fu.latest_good_checkpoint(broken.run_dir, log=False).name == "round_0002.pt"
    resumed = fu.Federation(tiny_config(rounds=4, checkpoint_dir=str(tmp_path / "b")), data=mnist_small,
                            resume=True, log=False)
    assert resumed.round == 2 and (broken.run_dir / "round_0003.pt.bad").is_file()  # set aside, not deleted
    resumed.run(progress=False)
    assert [r["d_loss"] for r in resumed.history] == [r["d_loss"] for r in straight.history]
    assert states_equal(resumed.generator.state_dict(), straight.generator.state_dict())
    assert fu.load_checkpoint(broken.run_dir / "round_0003.pt")["round"] == 3  # rewritten, with its checksum


RUNNER = """
import sys
import fedgan_utils as fu
images, labels = fu.load_dataset("mnist")
config = fu.FedConfig.from_json(sys.argv[1])
fu.run_federation(config, data=(images[:1200], labels[:1200]), resume=True, progress=False)
"""


def test_a_run_killed_with_sigkill_resumes_to_exactly_the_uninterrupted_result(mnist_small, tiny_config, tmp_path):
    config = tiny_config(rounds=8, local_steps=25, batch_size=16, optimizer_state="keep", bn_policy="local",
                         strategy="fedadam", checkpoint_dir=str(tmp_path / "killed"))
    env = {**os.environ, "PYTHONPATH": str(Path(fu.__file__).parent), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen([sys.executable, "-c", RUNNER, config.to_json()], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_dir = Path(config.checkpoint_dir) / config.run_name
    deadline = time.time() + 120
    while not (run_dir / "round_0003.pt").exists():  # killed while round 4 trains (or its checkpoint is written)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run did not reach round 3 in 2 minutes"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = fu.latest_good_checkpoint(run_dir, log=False)
    assert saved is not None and fu.load_checkpoint(saved)["round"] < 8  # it was killed mid-run
    # what a kill during the next checkpoint write leaves: a .partial file and, maybe, its checksum
    following = run_dir / f"round_{fu.load_checkpoint(saved)['round'] + 1:04d}.pt"
    if not following.exists():
        following.with_name(following.name + ".partial").write_bytes(b"torn")
        fu.checksum_path(following).write_text("0" * 64 + "  " + following.name + "\n")
    resumed = fu.run_federation(config, data=mnist_small, resume=True, progress=False)
    straight = fu.run_federation(tiny_config(**{**config.__dict__, "checkpoint_dir": str(tmp_path / "straight")}),
                                 data=mnist_small, progress=False)
    assert [r["g_loss"] for r in resumed.history] == [r["g_loss"] for r in straight.history]
    assert states_equal(resumed.generator.state_dict(), straight.generator.state_dict())
    assert states_equal(resumed.discriminator.state_dict(), straight.discriminator.state_dict())
    assert [p.name for p in fu.list_checkpoints(run_dir)] == [f"round_{r:04d}.pt" for r in range(1, 9)]


def test_a_client_whose_local_training_raises_is_left_out_and_the_others_train(mnist_small, tiny_config):
    federation = fu.Federation(tiny_config(rounds=1), data=mnist_small, log=False)
    broken = torch.as_tensor(federation.parts[1])
    federation.client_labels = federation.labels.clone()
    federation.client_labels[broken] = 99  # malformed data: a label the generator's embedding does not have
    record = federation.run_round()
    assert list(record["failed"]) == [1] and "IndexError" in record["failed"][1]
    assert record["clients"] == [0, 2] and np.isfinite(record["d_loss"])
    federation.client_labels[:] = 99
    with pytest.raises(RuntimeError, match="round 2: the local training of every client failed"):
        federation.run_round()


def test_every_torch_load_in_the_code_is_weights_only():
    import ast

    repo = Path(fu.__file__).parent
    sources = [*repo.glob("fedgan/**/*.py"), *repo.glob("benchmarks/*.py")]
    calls = [node for source in sources for node in ast.walk(ast.parse(source.read_text()))
             if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"]
    assert calls, "the package loads checkpoints with torch.load"
    for call in calls:
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert keywords.get("weights_only") == "True", ast.unparse(call)
