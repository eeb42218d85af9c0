"""Federation: the round loop of a federated cDCGAN, with asynchrony, faults and checkpoints."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from fedgan.aggregation import fedavg_stacked, fednova_rescale, scale_updates, staleness_weight
from fedgan.checkpoints import (
    CheckpointError, claim_run_dir, flat_adam_states, latest_checkpoint, pack_grid, prune_checkpoints, restore_newest,
    run_folders, save_checkpoint, unpack_grid, write_claim)
from fedgan.compression import compress_updates
from fedgan.config import DATASETS, MULTI_D_LAYOUTS, FedConfig, clients_per_round
from fedgan.data import check_data, load_dataset, training_images
from fedgan.engine.precision import bfloat16_compute, warn_if_slow_bfloat16
from fedgan.engine.stacked import broadcast, fresh_adam_state, map_tensors, slice_client, stack_clients
from fedgan.engine.trainer import train_clients
from fedgan.environment import env_report, pick_device, rng_state, seed_everything, set_rng_state
from fedgan.gan import LocalTraining, generator_steps
from fedgan.metrics import Evaluator, make_evaluator
from fedgan.models import build_models, generate, norm_state_keys
from fedgan.multi_discriminator import MultiDiscriminators
from fedgan.partition import partition, partition_report
from fedgan.privacy import noisy_state, private_round
from fedgan.rounds import (
    RNG_DROPOUT, RNG_NOISE, RNG_SELECTION, RoundPlan, attacker_ids, choose_clients, client_speeds,
    derive_seed, dominant_labels, flipped_labels, plan_clients, plan_round)
from fedgan.strategies import Strategy, bound_copy, checked_state, make_strategy
from fedgan.scaffold import ControlVariates
from fedgan.tensorboard_log import open_board
from fedgan.uploads import client_uploads, uses_error_feedback
from fedgan.watchdog import check_divergence

Tensor = torch.Tensor


def client_data(config: FedConfig, data: tuple[Tensor, Tensor] | None, device: torch.device
                ) -> tuple[Tensor, Tensor, list[np.ndarray], list[int], Tensor]:
    """The federation's training images and labels on `device` (uint8, int64), each client's indices into them, the
    attackers, and the labels the clients train on (a label-flipping attacker's own images' labels poisoned)."""
    images, labels = training_images(config, *(data if data is not None else
                                               load_dataset(config.dataset, config.data_root)))
    images, labels = images.to(device), labels.to(device)
    parts = partition(labels, config.num_clients, config.partition, seed=config.seed, **config.partition_kwargs())
    attackers = attacker_ids(config.num_clients, config.attack_fraction, config.seed)
    flipping = attackers if config.attack == "label_flip" else []
    return images, labels, parts, attackers, flipped_labels(labels, parts, flipping,
                                                            DATASETS[config.dataset].num_classes)


class Federation:
    """A federated cDCGAN run: global G and D, the clients' data, and the round loop.

    `run()` runs the remaining rounds; `run_round()` runs one, for notebooks that want to look between rounds. The
    global models are `.generator` and `.discriminator` (in a multi-discriminator layout, the D every client started
    from: the clients' own are `.multi_d.d_state`); `.history` holds one record per round. A `strategy` object
    replaces the rule that config.strategy names; it is copied once for G and once for D, so each keeps its own
    server state.
    """

    def __init__(self, config: FedConfig, *, data: tuple[Tensor, Tensor] | None = None, resume: bool = False,
                 log: bool = True, strategy: Strategy | None = None):
        if not isinstance(config, FedConfig):
            raise TypeError(f"config must be a FedConfig, got {type(config).__name__}")
        if strategy is not None and not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a Strategy (fedgan/strategies.py) or None for "
                            f"config.strategy, got {type(strategy).__name__}")
        self.config, self.log = config, log
        self.device = pick_device(config.device)
        warn_if_slow_bfloat16(config.engine.bfloat16, self.device)
        if data is not None:
            check_data(*data, config.dataset)
        self.images, self.labels, self.parts, self.attackers, self.client_labels = client_data(config, data,
                                                                                               self.device)
        num_classes = DATASETS[config.dataset].num_classes
        self.groups = dominant_labels(self.labels, self.parts, num_classes)  # stratified selection's groups
        seed_everything(config.seed)
        generator, discriminator = build_models(config)
        self.generator, self.discriminator = generator.to(self.device), discriminator.to(self.device)
        networks = (("g", generator), ("d", discriminator))
        # keys each client keeps for itself: a whole network that is not synchronised, else its BN layers (FedBN)
        self._local_keys = {which: set(model.state_dict()) if not self.synced(which)
                            else norm_state_keys(model) if config.bn_policy == "local" else set()
                            for which, model in networks}
        self.strategies = {which: make_strategy(config, {n for n, _ in model.named_buffers()}) if strategy is None
                           else bound_copy(strategy, {n for n, _ in model.named_buffers()})
                           for which, model in networks}
        self.strategy_name = config.strategy if strategy is None else type(strategy).__name__
        self.controls = (ControlVariates(dict(networks), config.num_clients) if config.strategy == "scaffold"
                         else None)  # SCAFFOLD's control variates: the server's here, the clients' in their stores
        self.multi_d = (MultiDiscriminators(config, generator, discriminator, partition_report(
            self.client_labels, self.parts, num_classes)) if config.gan_layout in MULTI_D_LAYOUTS else None)
        self._param_names = {which: {n for n, _ in model.named_parameters()} for which, model in networks}
        self.local_training = LocalTraining.of(config)
        self.speeds = client_speeds(config.num_clients, config.client_speed_sigma, config.seed)
        self.clock = 0.0  # simulated time, in local steps of a speed-1 client
        self.in_flight: list[dict[str, Any]] = []  # async: clients training, with their results and finish time
        self.server_g_opt: torch.optim.Adam | None = None  # gan_layout="server_g": the server's optimizer of G
        info = DATASETS[config.dataset]
        # one fixed noise a column, one label a row: grids over rounds stay comparable
        fixed = torch.randn(10, config.z_dim, generator=torch.Generator().manual_seed(config.seed))
        self.fixed_labels = torch.arange(info.num_classes).repeat_interleave(10)  # (100,)
        self.fixed_noise = fixed.repeat(info.num_classes, 1)  # (100, z_dim)
        self.client_store: dict[int, dict[str, Any]] = {}  # per-client state that persists across rounds
        self.history: list[dict[str, Any]] = []
        self.evaluator: Evaluator | None = None  # built on the first evaluation (trains the metric classifier)
        self.grid_snapshots: dict[int, Tensor] = {}  # round -> fixed-noise grid images, CPU
        self.round = 0
        self.run_dir = self._open_run(resume)
        self.out_dir = Path(config.out_dir) / self.run_dir.name
        self.board = open_board(config, self.run_dir.name)  # TensorBoard, when config.tensorboard asks for it
        if self.round == 0:
            self.grid_snapshots[0] = self.sample_grid()

    # -- set-up ---------------------------------------------------------------------------------
    def _open_run(self, resume: bool) -> Path:
        """The run's checkpoint folder. With `resume`, the newest run of this name (run_name or run_name-N),
        restored from its newest checkpoint that restores (the ones that do not are set aside); else, or with no
        such run, a new folder claimed for this run."""
        config, log = self.config, self.log
        checkpoint_dir = Path(config.checkpoint_dir)
        folders = run_folders(checkpoint_dir, config.run_name) if resume else []
        runs = {folder: path for folder in folders if (path := latest_checkpoint(folder)) is not None}  # newest each
        if resume and not runs and log:
            print(f"resume=True: no run named {config.run_name} has a checkpoint in {checkpoint_dir}; a new run "
                  "starts")
        if not runs:
            return claim_run_dir(checkpoint_dir, Path(config.out_dir), config.run_name)
        run_dir = max(runs, key=lambda folder: runs[folder].stat().st_mtime)
        write_claim(run_dir, config.run_name, exclusive=False)  # this run continues it; and it can be written
        fresh, history, snapshots = self._round_state(), self.history, self.grid_snapshots
        if restore_newest(run_dir, self._restore, log) is None:
            self._return_to(fresh)
            self.round, self.history, self.grid_snapshots = 0, history, snapshots
            if log:
                print(f"no checkpoint of {run_dir} restores: the run starts again from round 0")
        return run_dir

    def _restore(self, path: Path, checkpoint: Mapping[str, Any]) -> None:
        """Take the run's state from a checkpoint; CheckpointError when its contents do not restore."""
        try:
            saved = FedConfig.from_json(checkpoint["config"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: its config does not load ({type(error).__name__}: {error})") from error
        may_change = saved.resume_may_change
        differs = [f.name for f in dataclasses.fields(FedConfig)
                   if f.name not in may_change and getattr(saved, f.name) != getattr(self.config, f.name)]
        if differs:  # the caller's to fix, not a damaged file: no fallback
            raise ValueError(f"cannot resume from {path}: the config differs in {differs}; resume with the saved "
                             f"config (only {' and '.join(may_change)} may change)")
        try:
            self._take_state(checkpoint)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
            raise CheckpointError(f"{path} does not restore ({type(error).__name__}: {str(error)[:300]})") from error
        if self.log:
            print(f"resumed from {path} (round {self.round})")

    def _take_state(self, checkpoint: Mapping[str, Any]) -> None:
        self.generator.load_state_dict(checkpoint["generator"])
        self.discriminator.load_state_dict(checkpoint["discriminator"])
        self.client_store = {int(k): v for k, v in checkpoint["client_store"].items()}
        flat_adam_states(self.client_store, {"g": self.generator, "d": self.discriminator})
        self.history = checkpoint["history"]
        self.grid_snapshots = {int(k): unpack_grid(v) for k, v in checkpoint["grid_snapshots"].items()}
        self.round = checkpoint["round"]
        for which, strategy in self.strategies.items():  # the server state computes on this run's device
            strategy.load_state_dict(map_tensors(checkpoint["strategies"][which], lambda t: t.to(self.device)))
        # format 1 checkpoints (before asynchrony and the server generator) lack these; simulated time restarts at 0
        self.clock, self.in_flight = checkpoint.get("clock", 0.0), checkpoint.get("in_flight", [])
        for name, part in self._server_parts().items():
            part.load_state_dict(checkpoint[name])
        self.server_g_opt = None
        if checkpoint.get("server_g_opt") is not None:
            self.server_g_opt = torch.optim.Adam(self.generator.parameters(), lr=self.config.lr_g,
                                                 betas=self.config.betas)
            self.server_g_opt.load_state_dict(checkpoint["server_g_opt"])
        set_rng_state(checkpoint["rng"])

    # -- one round ------------------------------------------------------------------------------
    def synced(self, which: str) -> bool:
        """Whether network "g" or "d" is synchronised with the server (config.sync_networks)."""
        return self.config.sync_networks in ("both", which)

    def client_losses(self) -> dict[int, float]:
        """Each client's discriminator loss from the last round it trained (power-of-choice ranks by it)."""
        return {c: store["last_loss"] for c, store in self.client_store.items() if "last_loss" in store}

    def _client_start(self, which: str, model: nn.Module, plan: RoundPlan) -> dict[str, Tensor]:
        """The stacked state each selected client starts from: the global one, with its own local keys kept."""
        stacked = broadcast(model.state_dict(), len(plan.client_ids))
        local = self._local_keys[which]
        for row, client in enumerate(plan.client_ids):
            own = self.client_store.get(int(client), {}).get(f"{which}_local")
            for key in local if own is not None else ():
                stacked[key][row] = own[key].to(self.device)
        return stacked

    def _client_optimizers(self, which: str, plan: RoundPlan) -> dict[str, Tensor] | None:
        """The plan's clients' Adam states for one network, stacked (optimizer_state="keep"); None: fresh ones."""
        if self.config.optimizer_state == "reset":
            return None
        model = self.generator if which == "g" else self.discriminator
        fresh = slice_client(fresh_adam_state(1, sum(p.numel() for p in model.parameters())), 0)
        trees = [self.client_store.get(int(c), {}).get(f"{which}_opt", fresh) for c in plan.client_ids]
        return stack_clients(trees, self.device)

    def _bytes_down(self) -> int:
        """Bytes the server sends one client: the synchronised keys of the synchronised networks."""
        return sum(v.numel() * v.element_size() for which, model in (("g", self.generator), ("d", self.discriminator))
                   for k, v in model.state_dict().items() if k not in self._local_keys[which]) + (
            self.controls.bytes_per_client() if self.controls is not None else 0)

    def _train(self, plan: RoundPlan) -> dict[str, Any]:
        """Local training of the plan's clients; if it raises, each client alone, leaving out those that fail.

        Trained alone, a client draws its own row of the round's noise: the others train what they would have.
        """
        try:
            return self._train_together(plan)
        except Exception as error:  # noqa: BLE001 - a client's failure must not end the run
            if len(plan.client_ids) == 1:
                raise
            first_error = error
        results, failed = [], {}
        for row, client in enumerate(plan.client_ids):
            alone = dataclasses.replace(plan, client_ids=plan.client_ids[row:row + 1],
                                        sizes=plan.sizes[row:row + 1], steps=plan.steps[row:row + 1],
                                        batch_indices=plan.batch_indices[row:row + 1, :plan.steps[row]],
                                        noise_rows=np.array([row]), noise_width=len(plan.client_ids))
            try:
                results.append(self._train_together(alone))
            except Exception as error:  # noqa: BLE001
                failed[int(client)] = f"{type(error).__name__}: {error}"
        if not results:
            raise RuntimeError(f"round {plan.round}: the local training of every client failed") from first_error
        if self.log and failed:
            print(f"round {plan.round}: left out clients {sorted(failed)}: their local training raised "
                  f"({next(iter(failed.values()))})")
        merged: dict[str, Any] = {key: np.concatenate([r[key] for r in results])
                                  for key in ("client_ids", "sizes", "steps", "staleness")}
        for part in ("start", "final"):
            merged[part] = {which: {k: torch.cat([r[part][which][k] for r in results])
                                    for k in results[0][part][which]} for which in ("g", "d")}
        if self.controls is not None:
            merged["controls"] = {w: torch.cat([r["controls"][w] for r in results]) for w in ("g", "d")}
        merged.update(d_loss=[x for r in results for x in r["d_loss"]],
                      g_loss=[x for r in results for x in r["g_loss"]], failed=failed)
        return merged

    def _train_together(self, plan: RoundPlan) -> dict[str, Any]:
        """Local training of the plan's clients from the current global models: their start and final states."""
        starts = {"g": self._client_start("g", self.generator, plan),
                  "d": self._client_start("d", self.discriminator, plan)}
        local = train_clients(self.generator, self.discriminator, starts["g"], starts["d"], self.images,
                              self.client_labels, plan, self.local_training, self.config.engine,
                              g_opt=self._client_optimizers("g", plan), d_opt=self._client_optimizers("d", plan),
                              corrections=self.controls.corrections(plan.client_ids, self.client_store)
                              if self.controls is not None else None)
        d_losses, g_losses = local.d_loss.tolist(), local.g_loss.tolist()  # the round's one sync
        for row, client in enumerate(plan.client_ids):
            store = self.client_store.setdefault(int(client), {})
            store["last_loss"] = d_losses[row]
            if self.config.optimizer_state == "keep":
                store["g_opt"] = slice_client(local.g_opt, row)
                store["d_opt"] = slice_client(local.d_opt, row)
        final = {"g": local.g_state, "d": local.d_state}
        return {"client_ids": plan.client_ids, "sizes": plan.sizes, "steps": plan.steps,
                "staleness": np.zeros(len(plan.client_ids)), "start": starts, "final": final, "d_loss": d_losses,
                "g_loss": g_losses, **({} if self.controls is None else {"controls": local.mean_gradients})}

    def _client_updates(self, which: str, updates: Mapping[str, Any], round_index: int) -> tuple[dict, int]:
        """What each client sends for one network: its update, attacked if it attacks, compressed with error
        feedback if asked for; and the bytes that takes a client.

        Parameters travel as updates (state - start); attacks and compression act on those. Buffers (BN
        running statistics, counters) travel as the client's values, dense: a running variance rebuilt from a
        stale or compressed difference can turn negative.
        """
        config, ids = self.config, updates["client_ids"]
        start, final = updates["start"][which], updates["final"][which]
        sent_keys = [k for k in final if k not in self._local_keys[which]]
        floats = [k for k in sent_keys if k in self._param_names[which]]
        residual_key = f"{which}_residual"
        residuals = [self.client_store[int(c)].get(residual_key) for c in ids] if uses_error_feedback(config) else None
        sent, kept, nbytes = client_uploads({k: final[k] - start[k] for k in floats}, ids, config, round_index,
                                            self.attackers, residuals)  # (K, ...) each
        for client, residual in zip(ids, kept or ()):
            self.client_store[int(client)][residual_key] = residual
        buffers, buffer_bytes = compress_updates({k: final[k] for k in sent_keys if k not in floats}, "none")
        return {**sent, **buffers}, nbytes + buffer_bytes

    def uploads(self, which: str) -> bool:
        """Whether clients send network "g" or "d" back (not one kept local, nor G under gan_layout="server_g")."""
        return self.synced(which) and not (which == "g" and self.config.gan_layout == "server_g")

    def _aggregate(self, updates: Mapping[str, Any], round_index: int) -> dict[str, Any]:
        """Clients: local keys kept, updates sent (see _client_updates). Server: clients whose update or loss
        is not finite are left out, then staleness weights, DP-FedAvg's clip and noise, FedNova and the strategy."""
        config, ids = self.config, updates["client_ids"]
        log: dict[str, Any] = {"bytes_up": 0, "server": {}, **({"failed": updates["failed"]} if "failed" in updates
                                                                else {})}
        sent: dict[str, dict[str, Tensor]] = {}
        usable = np.isfinite(updates["d_loss"]) & np.isfinite(updates["g_loss"])  # (K,)
        for which in ("g", "d"):
            final = updates["final"][which]
            for row, client in enumerate(ids if self._local_keys[which] else ()):
                self.client_store[int(client)][f"{which}_local"] = slice_client(
                    {k: final[k] for k in self._local_keys[which]}, row)
            if self.uploads(which):
                sent[which], nbytes = self._client_updates(which, updates, round_index)
                log["bytes_up"] += nbytes * len(ids)
            for tensor in (sent[which] if self.uploads(which) else final).values():
                if tensor.dtype.is_floating_point:
                    usable &= torch.isfinite(tensor.flatten(1)).all(1).cpu().numpy()
        if self.controls is not None:  # SCAFFOLD: each client's change of c_i beside its update
            log["bytes_up"] += self.controls.bytes_per_client() * len(ids)
        if not usable.all():
            log["excluded"] = ids[~usable].tolist()
            if self.log:
                print(f"round {round_index}: left out clients {log['excluded']}: their update or loss is NaN/Inf")
        if usable.sum() < config.updates_needed:
            log["kept_global"] = True
            if self.log:
                print(f"round {round_index}: {int(usable.sum())} usable updates < the {config.updates_needed} a round "
                      "needs (FedConfig.updates_needed); the global models stay as they were")
            return log
        rows = torch.as_tensor(np.flatnonzero(usable))

        def usable_rows(tree: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return dict(tree) if usable.all() else {k: v[rows.to(v.device)] for k, v in tree.items()}
        weights, steps = updates["sizes"][usable].astype(np.float64), updates["steps"][usable]
        info = {"client_ids": ids[usable], "steps": steps, "staleness": updates["staleness"][usable]}
        scale = staleness_weight(info["staleness"], config.staleness, config.staleness_a, config.staleness_b)
        attacked = config.attack in ("sign_flip", "noise") and any(c in self.attackers for c in info["client_ids"])
        received = {which: usable_rows(tree) for which, tree in sent.items()}
        if config.dp_clip is not None:  # DP covers everything sent: parameter updates and buffer changes
            buffer_changes = {}
            for which, tree in received.items():
                buffers = [k for k, v in tree.items() if k not in self._param_names[which] and v.is_floating_point()]
                final, start = (usable_rows({k: updates[part][which][k] for k in buffers})
                                for part in ("final", "start"))
                buffer_changes[which] = {k: final[k] - start[k] for k in buffers}
            noisy = private_round({which: {**received[which], **buffer_changes[which]} for which in received},
                                  config, round_index, log, self.device)
        for which, model in (("g", self.generator), ("d", self.discriminator)):
            final = usable_rows(updates["final"][which])
            if not self.synced(which):  # nothing is sent; the average only serves to sample from
                model.load_state_dict(fedavg_stacked(final, weights))
                continue
            if not self.uploads(which):  # G under gan_layout="server_g": trained below, on the server
                continue
            global_state = model.state_dict()
            floats = [k for k in received[which] if k in self._param_names[which]]
            effective, client_weights = dict(final), weights  # as the clients left them: exact when unchanged
            if config.dp_clip is not None:  # one noisy mean update, applied as a single client
                effective, client_weights = noisy_state(global_state, noisy[which], final), np.ones(1)
            elif config.compression != "none" or attacked or (scale != 1).any():  # global + weight x what was sent
                effective.update(scale_updates(global_state, {k: global_state[k] + received[which][k] for k in floats},
                                               torch.as_tensor(scale), floats))
            if config.step_normalisation == "fednova" and config.dp_clip is None:
                effective = fednova_rescale(global_state, effective, steps, weights, floats)
            strategy = self.strategies[which]
            model.load_state_dict(checked_state(strategy.aggregate(global_state, effective, client_weights, info),
                                                global_state, strategy, which))
            if strategy.last_log:
                log["server"][which] = dict(strategy.last_log)
        if self.controls is not None:
            self.controls.aggregate(info["client_ids"], usable_rows(updates["controls"]), self.client_store)
        if config.gan_layout == "server_g":
            log["server_g_loss"] = self._train_server_generator(round_index, int(round(float(np.mean(steps)))))
        return log

    def _train_server_generator(self, round_index: int, steps: int) -> float:
        """DP-FedAvg-GAN's server step: G trained against a copy of the aggregated D; returns G's mean loss."""
        config = self.config
        if self.server_g_opt is None:
            self.server_g_opt = torch.optim.Adam(self.generator.parameters(), lr=config.lr_g, betas=config.betas)
        critic = copy.deepcopy(self.discriminator).train().requires_grad_(False)
        draws = torch.Generator(device=self.device).manual_seed(derive_seed(config.seed, round_index, RNG_NOISE, 1))
        return generator_steps(self.generator, critic, self.server_g_opt, steps=config.server_g_steps or max(1, steps),
                               batch_size=config.batch_size, num_classes=DATASETS[config.dataset].num_classes,
                               draws=draws, loss=config.gan_loss,
                               compute=lambda: bfloat16_compute(config.engine.bfloat16))

    def _async_updates(self, round_index: int) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """FedBuff-style asynchrony: keep `concurrency` clients training, apply the next `async_buffer` arrivals.

        A client trains from the global model of the moment it is dispatched and arrives steps / speed
        time units later; its update is weighted by staleness (server versions since its dispatch).
        """
        config, K = self.config, self.config.num_clients
        concurrency = clients_per_round(K, config.client_fraction)
        buffer = config.arrivals_per_update
        busy = {entry["client"] for entry in self.in_flight}
        idle = [c for c in range(K) if c not in busy]
        log: dict[str, Any] = {"dropped_out": [], "late": [], "trained": [], "images": 0}
        if concurrency > len(self.in_flight):
            rng = np.random.default_rng(derive_seed(config.seed, round_index, RNG_SELECTION))
            ids = choose_clients(idle, concurrency - len(self.in_flight), rng, policy=config.selection,
                                 sizes=[len(p) for p in self.parts], losses=self.client_losses(),
                                 candidates=config.poc_candidates, groups=self.groups)
            trained = self._train(plan_clients(config, self.parts, ids, round_index))
            for row, client in enumerate(ids):
                self.in_flight.append({
                    "client": int(client), "version": self.round, "size": int(trained["sizes"][row]),
                    "steps": int(trained["steps"][row]),
                    "finish": float(self.clock + trained["steps"][row] / self.speeds[client]),
                    "d_loss": trained["d_loss"][row], "g_loss": trained["g_loss"][row],
                    **{f"{which}_{part}": slice_client(trained[part][which], row)
                       for which in ("g", "d") for part in ("start", "final")}})
            log.update(trained=ids.tolist(), images=int(trained["steps"].sum()) * config.batch_size,
                       bytes_down=self._bytes_down() * len(ids))
        self.in_flight.sort(key=lambda entry: (entry["finish"], entry["client"]))
        arrived, self.in_flight = self.in_flight[:buffer], self.in_flight[buffer:]
        log["sim_time"] = max(e["finish"] for e in arrived) - self.clock
        lost = np.random.default_rng(derive_seed(config.seed, round_index, RNG_DROPOUT)).random(
            len(arrived)) < config.dropout
        log["dropped_out"] = [e["client"] for e, gone in zip(arrived, lost) if gone]
        arrived = [e for e, gone in zip(arrived, lost) if not gone]
        if not arrived:
            return None, log
        updates = {"client_ids": np.array([e["client"] for e in arrived]),
                   "sizes": np.array([e["size"] for e in arrived]), "steps": np.array([e["steps"] for e in arrived]),
                   "staleness": np.array([self.round - e["version"] for e in arrived], dtype=np.float64),
                   "d_loss": [e["d_loss"] for e in arrived], "g_loss": [e["g_loss"] for e in arrived],
                   **{part: {which: stack_clients([e[f"{which}_{part}"] for e in arrived], self.device)
                             for which in ("g", "d")} for part in ("start", "final")}}
        log["staleness"] = updates["staleness"].tolist()
        return updates, log

    def run_round(self) -> dict[str, Any]:
        """Select, broadcast, train locally, aggregate, log: one communication round (async: one server update)."""
        config = self.config
        start = time.perf_counter()
        before = self._round_state()
        try:  # a round applies all of its training and aggregation, or none of it (nor one whose models diverged)
            if config.sync_mode == "async":
                updates, log = self._async_updates(self.round + 1)
            else:
                plan = plan_round(config, self.parts, self.round + 1, self.client_losses(), self.groups)
                updates = None if not len(plan.client_ids) else self._train(plan) if self.multi_d is None else (
                    self.multi_d.train_round(self.generator, self.discriminator, self.images, self.client_labels, plan,
                                             self.client_store))
                log = {"dropped_out": plan.dropped_out, "late": plan.late, "sim_time": plan.sim_time,
                       "images": int(plan.steps.sum()) * config.batch_size,
                       "bytes_down": self._bytes_down() * len(plan.client_ids)}
            if updates is not None and not len(updates["client_ids"]):  # all lost on the way (a Flower node gone)
                log["failed"], updates = updates["failed"], None
            if updates is not None:
                log.update(self._aggregate(updates, self.round + 1) if self.multi_d is None else updates["log"])
            elif self.log:
                print(f"round {self.round + 1}: no client reported back; the global models stay as they were")
            seconds = time.perf_counter() - start
            weights = updates["sizes"].astype(np.float64) if updates is not None else None
            previous = self.history[-1] if self.history else {}
            record = {
                "round": self.round + 1,
                "clients": updates["client_ids"].tolist() if updates is not None else [],
                "d_loss": float(np.average(updates["d_loss"], weights=weights)) if updates is not None else math.nan,
                "g_loss": float(np.average(updates["g_loss"], weights=weights)) if updates is not None else math.nan,
                "d_loss_clients": updates["d_loss"] if updates is not None else [],
                "g_loss_clients": updates["g_loss"] if updates is not None else [],
                "seconds": seconds,
                "images_total": log["images"] + previous.get("images_total", 0),
                "images_per_s": log["images"] / seconds,
                "sim_time_total": self.clock + log["sim_time"],
                "bytes_total": log.get("bytes_up", 0) + log.get("bytes_down", 0) + previous.get("bytes_total", 0),
                **log,
            }
            check_divergence(record, self.history, {"generator": self.generator, "discriminator": self.discriminator},
                             config, latest_checkpoint(self.run_dir))
        except BaseException:
            self._return_to(before)
            raise
        self.round, self.clock = record["round"], record["sim_time_total"]
        every, failed = config.eval_every, None
        if every is not None and ((every and self.round % every == 0) or self.round == config.rounds):
            eval_start = time.perf_counter()
            try:
                record["metrics"] = self.evaluate()
            except Exception as error:  # out of memory while scoring, say: the round's training is kept
                failed, record["eval_error"] = error, f"{type(error).__name__}: {error}"
            record["eval_seconds"] = time.perf_counter() - eval_start
        self.history.append(record)
        self.grid_snapshots[self.round] = self.sample_grid()
        if self.board is not None:
            self.board.write(record, self.grid_snapshots[self.round])
        every = config.checkpoint_every
        if (every and self.round % every == 0) or self.round == config.rounds or failed:
            self.save_checkpoint()
        if failed:
            raise failed
        return record

    def _server_parts(self) -> dict[str, Any]:
        """SCAFFOLD's control variates and a multi-discriminator layout's state, where the config has them."""
        return {name: part for name, part in (("controls", self.controls), ("multi_d", self.multi_d)) if part}

    def _round_state(self) -> dict[str, Any]:
        """What a round changes, copied: the global models, the clients' and the server's state, asynchrony's."""
        return copy.deepcopy({
            "generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
            "client_store": self.client_store, "strategies": self.strategies, "in_flight": self.in_flight,
            "clock": self.clock, "server_g_opt": self.server_g_opt.state_dict() if self.server_g_opt else None,
            **{name: part.state_dict() for name, part in self._server_parts().items()}})

    def _return_to(self, state: dict[str, Any]) -> None:
        """Undo a round that failed part way: every piece of _round_state as it was before it."""
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.client_store, self.strategies = state["client_store"], state["strategies"]
        self.in_flight, self.clock = state["in_flight"], state["clock"]
        for name, part in self._server_parts().items():
            part.load_state_dict(state[name])
        if state["server_g_opt"] is None:
            self.server_g_opt = None
        else:
            self.server_g_opt.load_state_dict(state["server_g_opt"])

    def evaluate(self) -> dict[str, Any]:
        """Metrics of the global generator against the real test set (see Evaluator; its `reference` too)."""
        if self.evaluator is None:
            self.evaluator = make_evaluator(self.config, self.images, self.device, log=self.log)
        return self.evaluator(self.generator)

    def run(self, rounds: int | None = None, progress: bool = True) -> "Federation":
        """Run until `rounds` (default: config.rounds) rounds are done; one log line a round."""
        from tqdm.auto import tqdm

        target = self.config.rounds if rounds is None else rounds
        bar = tqdm(range(self.round, target), desc="rounds", disable=not progress)
        for _ in bar:
            record = self.run_round()
            bar.set_postfix(d_loss=f"{record['d_loss']:.3f}", g_loss=f"{record['g_loss']:.3f}")
            if self.log:
                bar.write(format_round(record))
        return self

    # -- outputs --------------------------------------------------------------------------------
    def sample_grid(self) -> Tensor:
        """The global generator on the fixed noise and labels: [100, C, H, W] in [-1, 1], CPU."""
        return generate(self.generator, self.fixed_labels, noise=self.fixed_noise).cpu()

    def save_run_info(self) -> dict[str, Any]:
        """Write env.json (env_report) and config.json into the run's output folder; returns the report."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        report = env_report()
        (self.out_dir / "env.json").write_text(json.dumps(report, indent=1))
        (self.out_dir / "config.json").write_text(self.config.to_json())
        return report

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """checkpoint_dir/<run>/round_XXXX.pt (or `path`): global models, client state, history, config."""
        path = self.run_dir / f"round_{self.round:04d}.pt" if path is None else Path(path)
        save_checkpoint(path, {
            "format": 3,
            "round": self.round,
            "config": self.config.to_json(),
            "generator_config": self.generator.config,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "client_store": {str(k): v for k, v in self.client_store.items()},
            "history": self.history,
            "grid_snapshots": {str(k): pack_grid(v) for k, v in self.grid_snapshots.items()},
            "strategies": {which: strategy.state_dict() for which, strategy in self.strategies.items()},
            "clock": self.clock,
            "in_flight": self.in_flight,
            "server_g_opt": self.server_g_opt.state_dict() if self.server_g_opt is not None else None,
            **{name: part.state_dict() for name, part in self._server_parts().items()},
            "rng": rng_state(),  # the rounds draw from (seed, round)-derived generators; this is the caller's
        })
        if path.parent == self.run_dir:
            prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
        return path


def format_round(record: Mapping[str, Any]) -> str:
    """One log line for a round."""
    line = (f"round {record['round']:3d} | D {record['d_loss']:.3f} | G {record['g_loss']:.3f} | "
            f"{record['seconds']:.1f} s | {record['images_per_s']:,.0f} img/s")
    if "metrics" in record:
        m = record["metrics"]
        line += f" | FID {m['fid']:.1f} | IS {m['is']:.2f} | cond_acc {m['cond_acc']:.3f}"
    return line


def run_federation(config: FedConfig, *, resume: bool = False, data: tuple[Tensor, Tensor] | None = None,
                   progress: bool = True) -> Federation:
    """Run a federated cDCGAN to config.rounds; `resume` continues from the run's latest checkpoint."""
    return Federation(config, data=data, resume=resume).run(progress=progress)
