"""FedConfig: validation of every field, JSON round trip, presets; EngineOptions."""
import dataclasses
import json

import numpy as np
import pytest

import fedgan_utils as fu


BAD_CONFIG_VALUES = [
    ("num_clients", 0, "integer >= 1"),
    ("num_clients", 2.5, "integer >= 1"),
    ("rounds", -1, "integer >= 1"),
    ("batch_size", 0, "integer >= 1"),
    ("alpha", 0, "number > 0"),
    ("alpha", -0.5, "number > 0"),
    ("client_fraction", 0, "(0, 1]"),
    ("client_fraction", 1.5, "(0, 1]"),
    ("lr_g", 0.0, "number > 0"),
    ("local_epochs", float("nan"), "number > 0"),
    ("local_steps", 0, "None or an integer >= 1"),
    ("betas", (0.5, 1.0), "two numbers in [0, 1)"),
    ("dataset", "imagenet", "['cifar10', 'fashion_mnist', 'mnist']"),
    ("partition", "random", "['iid', 'dirichlet', 'shards', 'classes', 'quantity']"),
    ("bn_policy", "sync", "['average', 'local']"),
    ("optimizer_state", "warm", "['reset', 'keep']"),
    ("strategy", "fedsgd", "'fedavgm', 'damped', 'fedadagrad'"),
    ("server_lr", 0, "None (the rule's default) or a number > 0"),
    ("server_momentum", 1.0, "[0, 1)"),
    ("trim_beta", 0.5, "[0, 0.5)"),
    ("krum_m", 0, "integer >= 1"),
    ("classes_per_client", 11, "from 1 to 10"),
    ("sigma", -1.0, "number >= 0"),
    ("seed", -3, "an integer from 0 to 2**32 - 1"),
    ("device", "tpu", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("train_subset", 5, "at least num_clients=10"),
    ("run_name", "a/b", "letters, digits"),
    ("selection", "random", "['uniform', 'proportional', 'power_of_choice', 'stratified']"),
    ("sync_networks", "none", "['both', 'g', 'd']"),
    ("sync_mode", "semi", "['sync', 'async']"),
    ("staleness", "linear", "['constant', 'polynomial', 'hinge']"),
    ("compression", "zip", "['none', 'topk', 'int8']"),
    ("threshold_action", "ignore", "['clip', 'drop']"),
    ("straggler_policy", "wait", "['partial', 'drop']"),
    ("step_normalisation", "scaffold", "['none', 'fednova']"),
    ("update_threshold", 0, "None or a number > 0"),
    ("round_deadline", -1.0, "None or a number > 0"),
    ("prox_mu", -0.1, "None or a number >= 0"),
    ("dropout", 1.0, "[0, 1)"),
    ("topk_fraction", 0, "(0, 1]"),
    ("client_speed_sigma", -1, "number >= 0"),
    ("error_feedback", 1, "True or False"),
    ("engine", {"client_map": "vmap"}, "an EngineOptions"),
]
BAD_ENGINE_OPTIONS = [
    ("client_map", "pmap", "['auto', 'vmap', 'loop', 'streams', 'reference']"),
    ("conv_form", "fft", "['auto', 'grouped', 'block', 'loop', 'triton']"),
    ("bfloat16", "yes", "True or False"),
    ("cuda_graphs", 1, "True or False"),
    ("deterministic", None, "True or False"),
    ("cuda_streams", 0, "an integer >= 1"),
    ("conv_block_clients", 2.0, "an integer >= 1"),
]


@pytest.mark.parametrize("make,field,value,allowed", [(fu.FedConfig, *case) for case in BAD_CONFIG_VALUES]
                         + [(fu.EngineOptions, *case) for case in BAD_ENGINE_OPTIONS])
def test_a_bad_value_names_the_field_the_value_and_what_is_allowed(make, field, value, allowed):
    with pytest.raises(ValueError) as error:
        make(**{field: value})
    message = str(error.value)
    assert message.startswith(f"{field}={value!r}")
    assert allowed in message


def test_json_round_trip_gives_an_equal_config():
    config = fu.FedConfig(num_clients=7, partition="dirichlet", alpha=0.1, betas=(0.4, 0.9), local_steps=5)
    again = fu.FedConfig.from_json(config.to_json())
    assert again == config
    assert again.betas == (0.4, 0.9)


def test_from_json_rejects_unknown_fields_by_name():
    with pytest.raises(ValueError, match=r"unknown FedConfig fields \['clients'\]"):
        fu.FedConfig.from_json('{"clients": 3}')


def test_run_name_is_derived_from_the_experiment():
    assert fu.FedConfig(num_clients=5, partition="shards", seed=2).run_name == "mnist_shards_k5_seed2"


def test_partition_kwargs_are_the_schemes_own():
    assert fu.FedConfig(partition="dirichlet", alpha=0.3).partition_kwargs() == {"alpha": 0.3, "min_size": 10}
    assert fu.FedConfig(partition="iid").partition_kwargs() == {}


@pytest.mark.parametrize("name", ["smoke", "cpu", "full"])
def test_presets_are_valid_configs_that_take_overrides(name):
    config = fu.preset(name, seed=4)
    assert isinstance(config, fu.FedConfig) and config.seed == 4


def test_smoke_is_smaller_than_cpu_which_is_smaller_than_full():
    smoke, cpu, full = (fu.preset(n) for n in ("smoke", "cpu", "full"))
    assert smoke.train_subset is not None and smoke.ngf < cpu.ngf < full.ngf
    def epochs(config):  # MNIST epochs of images the federation trains on
        return config.rounds * config.client_fraction * config.local_epochs

    assert epochs(cpu) < epochs(full)


def test_engine_options_given_as_config_fields_say_where_they_go():
    with pytest.raises(ValueError, match=r"\['amp', 'client_map'\]: options of the engine, not FedConfig fields; "
                                         r"pass engine=EngineOptions\(bfloat16=..., client_map=...\)"):
        fu.preset("smoke", client_map="vmap", amp=True)


def test_a_checkpoints_config_from_before_engine_options_loads_with_them_moved_in():
    values = json.loads(fu.FedConfig(num_clients=3).to_json())
    del values["engine"]
    values.update(client_map="vmap", amp=True, cuda_graphs=False, conv_form="block", conv_block_clients=2,
                  deterministic=False)  # the flat fields a format 2 checkpoint's config holds
    config = fu.FedConfig.from_json(json.dumps(values))
    assert config.engine == fu.EngineOptions(client_map="vmap", bfloat16=True, cuda_graphs=False, conv_form="block",
                                             conv_block_clients=2, deterministic=False)
    assert config.num_clients == 3
    with pytest.raises(ValueError, match=r"unknown EngineOptions fields \['warp'\]"):
        fu.FedConfig.from_json(json.dumps({"engine": {"warp": 9}}))


def test_the_clients_prox_mu_is_the_configs_or_fedproxs_default():
    assert fu.FedConfig().client_prox_mu == 0.0
    assert fu.FedConfig(strategy="fedprox").client_prox_mu == 0.01
    assert fu.FedConfig(strategy="fedprox", prox_mu=0.5).client_prox_mu == 0.5
    assert fu.FedConfig(strategy="fedadam", prox_mu=0.1).client_prox_mu == 0.1  # FedProx's term with any server


def test_unknown_preset_and_unknown_override_are_named():
    with pytest.raises(ValueError, match=r"preset='tiny' is not known; presets: \['smoke', 'cpu', 'full'\]"):
        fu.preset("tiny")
    with pytest.raises(ValueError, match=r"unknown FedConfig fields \['clients'\]"):
        fu.preset("smoke", clients=3)
    with pytest.raises(ValueError, match=r"\['partiton'\] \('partiton': did you mean 'partition'\?\); known fields"):
        fu.preset("smoke", partiton="dirichlet")  # a typo gets the field it is nearest
    with pytest.raises(ValueError, match="num_clients=0"):
        fu.preset("smoke", num_clients=0)


def test_default_preset_follows_the_environment(monkeypatch):
    monkeypatch.setenv("FEDGAN_PRESET", "smoke")
    assert fu.default_preset() == "smoke"
    monkeypatch.setenv("FEDGAN_PRESET", "huge")
    with pytest.raises(ValueError, match="FEDGAN_PRESET='huge' is not known"):
        fu.default_preset()
    monkeypatch.delenv("FEDGAN_PRESET")
    assert fu.default_preset() == ("full" if fu.pick_device().type == "cuda" else "cpu")


def test_combinations_that_cannot_work_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"prox_mu=0 .* strategy='fedprox'"):
        fu.FedConfig(strategy="fedprox", prox_mu=0)
    with pytest.raises(ValueError, match=r"round_deadline=5.0 .* sync_mode='async'"):
        fu.FedConfig(sync_mode="async", round_deadline=5.0)
    with pytest.raises(ValueError, match=r"async_buffer=6 .* at most the 5 clients in flight"):
        fu.FedConfig(sync_mode="async", num_clients=10, client_fraction=0.5, async_buffer=6)


def test_numpy_numbers_are_taken_as_the_python_numbers_they_are():
    config = fu.FedConfig(seed=np.int64(3), batch_size=np.int32(16), lr_g=np.float32(0.5), dp_delta=np.float64(1e-6),
                          error_feedback=np.bool_(False), betas=(np.float64(0.5), np.float32(0.75)))
    assert type(config.seed) is int and type(config.batch_size) is int and config.batch_size == 16
    assert type(config.lr_g) is float and config.lr_g == 0.5 and type(config.error_feedback) is bool
    assert all(type(b) is float for b in config.betas) and config.betas == (0.5, 0.75)
    assert fu.FedConfig.from_json(config.to_json()) == config  # a checkpoint can hold it
    assert type(fu.EngineOptions(cuda_streams=np.int64(4)).cuda_streams) is int


def test_seeds_are_what_numpy_and_torch_both_take():
    assert fu.FedConfig(seed=2 ** 32 - 1).seed == 2 ** 32 - 1
    with pytest.raises(ValueError, match=r"seed=4294967296 is not allowed: an integer from 0 to 2\*\*32 - 1"):
        fu.FedConfig(seed=2 ** 32)


def test_a_config_cannot_be_changed_behind_its_validation():
    config = fu.FedConfig()
    with pytest.raises(AttributeError, match="batch_size"):
        config.batch_size = 0
    with pytest.raises(ValueError, match="batch_size=0"):
        dataclasses.replace(config, batch_size=0)  # the way to another config: validated again
    with pytest.raises(AttributeError, match="client_map"):
        config.engine.client_map = "warp"


@pytest.mark.parametrize("values,message", [
    (dict(attack_fraction=0.2), r"attack_fraction=0.2 is not allowed: 0 with attack='none'"),
    (dict(attack="sign_flip", attack_fraction=0.04), r"attack_fraction=0.04 is not allowed: .*0 of the 10 clients"),
    (dict(attack="noise"), r"attack_fraction=0.0 is not allowed: .*0 of the 10 clients"),
    (dict(strategy="median", server_lr=0.5), r"server_lr=0.5 is not allowed: None with strategy='median'"),
    (dict(strategy="krum", krum_f=10), r"krum_f=10 is not allowed: an integer from 0 to 9: .*10 clients"),
    (dict(strategy="krum", num_clients=10, client_fraction=0.5, krum_m=6), r"krum_m=6 is not allowed: .*1 to 5"),
    (dict(gan_layout="ua_gan", strategy="median"), r"strategy='median' is not allowed: 'fedavg' with "
                                                    r"gan_layout='ua_gan' \(no parameters are averaged\)"),
    (dict(gan_layout="md_gan", dp_clip=1.0), r"dp_clip=1.0 is not allowed: None with gan_layout='md_gan'"),
    (dict(gan_layout="f2u", attack="sign_flip", attack_fraction=0.2), r"attack='sign_flip' is not allowed"),
    (dict(gan_layout="f2a", gan_loss="hinge"), r"gan_loss='hinge' is not allowed: 'bce' with gan_layout='f2a'"),
    (dict(gan_layout="md_gan", compression="int8"), r"compression='int8' is not allowed"),
    (dict(gan_layout="ua_gan", prox_mu=0.5), r"prox_mu=0.5 is not allowed: None or 0 with gan_layout='ua_gan'"),
    (dict(dp_clip=1.0, selection="stratified"), r"selection='stratified' is not allowed: 'uniform' with dp_clip"),
    (dict(sync_mode="async", num_clients=4, min_clients=3), r"min_clients=3 is not allowed: an integer from 1 to the 2 "
                                                            r"arrivals a server update applies"),
    (dict(sync_mode="async", num_clients=4, min_clients=3, async_buffer=2), r"min_clients=3 is not allowed"),
    (dict(gan_layout="server_g", sync_networks="d"), r"sync_networks='d' is not allowed"),
    (dict(strategy="scaffold", compression="topk"), r"compression='topk' is not allowed: 'none' with "
                                                    r"strategy='scaffold'"),
    (dict(strategy="scaffold", gan_layout="md_gan"), r"strategy='scaffold' is not allowed"),
    (dict(swap_every=0), r"swap_every=0 is not allowed: None \(never\) or an integer >= 1"),
    (dict(instance_noise=0.1, gan_layout="server_g"), r"instance_noise=0.1 is not allowed: 0 with "
                                                      r"gan_layout='server_g'"),
    (dict(instance_noise=-0.1), r"instance_noise=-0.1 is not allowed: a number >= 0"),
])
def test_settings_that_would_be_ignored_or_fail_after_a_round_are_refused_at_construction(values, message):
    with pytest.raises(ValueError, match=message):
        fu.FedConfig(**values)


def test_local_epochs_next_to_local_steps_is_named_as_unused(capsys):
    fu.FedConfig(local_steps=5)  # the default local_epochs: nothing to say
    assert capsys.readouterr().err == ""
    config = fu.FedConfig(local_steps=5, local_epochs=0.5)
    assert fu.local_steps_for(1000, config) == 5
    assert capsys.readouterr().err.strip() == ("warning: local_steps=5 is set, so local_epochs=0.5 is not used "
                                               "(local_steps overrides it)")


def test_the_old_server_generator_field_says_what_replaced_it_and_old_configs_load():
    with pytest.raises(ValueError, match=r"server_generator=True: the field was replaced by gan_layout; pass "
                                         r"gan_layout='server_g'"):
        fu.FedConfig(server_generator=True)
    with pytest.raises(ValueError, match="replaced by gan_layout"):
        fu.preset("smoke", server_generator=False)
    values = json.loads(fu.FedConfig(num_clients=3).to_json())
    assert "server_generator" not in values and values["gan_layout"] == "fedavg"
    del values["gan_layout"]
    for old, layout in ((True, "server_g"), (False, "fedavg")):  # a checkpoint's config from before gan_layout
        assert fu.FedConfig.from_json(json.dumps({**values, "server_generator": old})).gan_layout == layout
