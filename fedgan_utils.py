"""The helper the three FedGAN notebooks import as `fu`: the public API of the `fedgan` package, by name.

Nothing is defined here. Each name lives in the package module of its concept (`fedgan/config.py`,
`fedgan/federation.py`, ...; `fedgan/__init__.py` gives the reading order), so `fu.Federation` is
`fedgan.federation.Federation`: read it there.
"""
from fedgan.environment import cuda_arch_supported, pick_device, seed_everything, rng_state, set_rng_state, env_report
from fedgan.config import (
    DatasetInfo, DATASETS, PARTITIONS, BN_POLICIES, OPTIMIZER_STATES, CLIENT_MAPS, CONV_FORMS, STRATEGIES, SELECTIONS,
    SYNC_NETWORKS, SYNC_MODES, STALENESS_RULES, THRESHOLD_RULES, THRESHOLD_ACTIONS, STRAGGLER_POLICIES,
    STEP_NORMALISATIONS, COMPRESSIONS, ATTACKS, DP_STRATEGIES, CHOICES, PRESETS, PARTITION_PARAMS, EngineOptions,
    FedConfig, preset, default_preset, clients_per_round)
from fedgan.data import (
    MNIST_FILES, CIFAR_FOLDER, DatasetNotFoundError, cache_dir, load_dataset, to_float_images, examples_per_label,
    training_images)
from fedgan.partition import partition, partition_report
from fedgan.models import (
    dcgan_init_, Generator, SpectralConv2d, Discriminator, build_models, norm_state_keys, generate)
from fedgan.gan import LocalTraining, discriminator_loss, generator_loss, proximal_term, gan_step
from fedgan.rounds import (
    derive_seed, RNG_SELECTION, RNG_BATCHES, RNG_NOISE, RNG_SPEED, RNG_DROPOUT, RNG_ATTACK, RNG_DP, RoundPlan,
    step_noise, instance_noise_std, step_input_noise, choose_clients, select_clients, client_speeds, attacker_ids,
    poison_update, local_steps_for, plan_clients, plan_round)
from fedgan.aggregation import (
    fedavg_stacked, stack_states, unstack_states, fedavg, median, trimmed_mean, krum, update_norms, scale_updates,
    fednova_rescale, staleness_weight)
from fedgan.strategies import (
    Strategy, FedAvg, RobustRule, SERVER_OPTIMIZERS, ServerOptimizer, Thresholded, make_strategy)
from fedgan.compression import compress_updates
from fedgan.privacy import dp_epsilon, dp_noise_multiplier, privatize_updates
from fedgan.scaffold import server_control, ControlVariates
from fedgan.engine.trainer import (
    resolved_client_map, train_clients, LOCAL_TRAINERS_KEPT, clear_local_trainers, LocalTrainer)
from fedgan.engine.reference import train_clients_one_by_one
from fedgan.engine.stacked import (
    LocalResult, ADAM_MOMENTS, fresh_adam_state, StackedAdam, FlatParams, map_clients, broadcast)
from fedgan.engine.graphs import CudaGraphStep
from fedgan.engine.convolutions import block_diagonal_convolution, ClientConvolutions, AUTO_BLOCK_CLIENTS
from fedgan.engine.triton_conv import (
    TRITON_INTERPRETED, TRITON_TILES, triton_conv_forward, triton_conv_input_grad, triton_conv_weight_grad,
    triton_can_convolve, TritonClientConvolution)
from fedgan.engine.precision import BFloat16Compute
from fedgan.watchdog import DivergenceError
from fedgan.multi_discriminator import (
    universal_logits, forgiving_logits, forgiving_mixture, feedback_surrogate, label_shares, swap_permutation,
    step_bytes, MultiDiscriminators)
from fedgan.federation import Federation, format_round, run_federation
from fedgan.experiments import (
    CENTRALIZED_FIELDS, centralized_config, centralized_baseline, format_table, describe_partition, run_ablation,
    run_seeds)
from fedgan.cell_store import CellStore, FinishedRun
from fedgan.metrics import (
    Classifier, classifier_outputs, train_classifier, frechet_distance, kernel_distance, inception_score, Evaluator,
    evaluate, make_evaluator, inception_fid)
from fedgan.manifolds import knn_radii, manifold_metrics
from fedgan.checkpoints import (
    CheckpointError, CheckpointWriteError, checksum_path, save_checkpoint, prune_checkpoints, load_checkpoint,
    list_checkpoints, latest_checkpoint, latest_good_checkpoint, save_history, load_generator)
from fedgan.plots import (
    image_grid, plot_images, plot_label_grid, plot_grid_evolution, plot_losses, plot_partition, draw_checkpoint_samples,
    browse_checkpoints, plot_metrics, plot_per_class_accuracy, plot_metric_curves, plot_lines, plot_seed_spread,
    plot_class_heatmap, plot_sample_grids, plot_tradeoff, save_round_grids, save_grid_gif)

__all__ = [
    "cuda_arch_supported", "pick_device", "seed_everything", "rng_state", "set_rng_state", "env_report", "DatasetInfo",
    "DATASETS", "PARTITIONS", "BN_POLICIES", "OPTIMIZER_STATES", "CLIENT_MAPS", "CONV_FORMS", "STRATEGIES",
    "SELECTIONS", "SYNC_NETWORKS", "SYNC_MODES", "STALENESS_RULES", "THRESHOLD_RULES", "THRESHOLD_ACTIONS",
    "STRAGGLER_POLICIES", "STEP_NORMALISATIONS", "COMPRESSIONS", "ATTACKS", "DP_STRATEGIES", "CHOICES", "PRESETS",
    "PARTITION_PARAMS", "EngineOptions", "FedConfig", "preset", "default_preset", "clients_per_round", "MNIST_FILES",
    "CIFAR_FOLDER", "DatasetNotFoundError", "cache_dir", "load_dataset", "to_float_images", "examples_per_label",
    "training_images", "partition", "partition_report", "dcgan_init_", "Generator", "SpectralConv2d", "Discriminator",
    "build_models", "norm_state_keys", "generate", "LocalTraining", "discriminator_loss", "generator_loss",
    "proximal_term", "gan_step", "derive_seed", "RNG_SELECTION", "RNG_BATCHES", "RNG_NOISE", "RNG_SPEED", "RNG_DROPOUT",
    "RNG_ATTACK", "RNG_DP", "RoundPlan", "step_noise", "instance_noise_std", "step_input_noise", "choose_clients",
    "select_clients", "client_speeds", "attacker_ids", "poison_update", "local_steps_for", "plan_clients", "plan_round",
    "fedavg_stacked", "stack_states", "unstack_states", "fedavg", "median", "trimmed_mean", "krum", "update_norms",
    "scale_updates", "fednova_rescale", "staleness_weight", "Strategy", "FedAvg", "RobustRule", "SERVER_OPTIMIZERS",
    "ServerOptimizer", "Thresholded", "make_strategy", "compress_updates", "dp_epsilon", "dp_noise_multiplier",
    "privatize_updates", "server_control", "ControlVariates", "resolved_client_map", "train_clients",
    "LOCAL_TRAINERS_KEPT", "clear_local_trainers", "LocalTrainer", "train_clients_one_by_one", "LocalResult",
    "ADAM_MOMENTS", "fresh_adam_state", "StackedAdam", "FlatParams", "map_clients", "broadcast", "CudaGraphStep",
    "block_diagonal_convolution", "ClientConvolutions", "AUTO_BLOCK_CLIENTS", "TRITON_INTERPRETED", "TRITON_TILES",
    "triton_conv_forward", "triton_conv_input_grad", "triton_conv_weight_grad", "triton_can_convolve",
    "TritonClientConvolution", "BFloat16Compute", "DivergenceError", "universal_logits", "forgiving_logits",
    "forgiving_mixture", "feedback_surrogate", "label_shares", "swap_permutation", "step_bytes", "MultiDiscriminators",
    "Federation", "format_round", "run_federation", "CENTRALIZED_FIELDS", "centralized_config", "centralized_baseline",
    "format_table", "describe_partition", "run_ablation", "run_seeds", "CellStore", "FinishedRun", "Classifier",
    "classifier_outputs", "train_classifier", "frechet_distance", "kernel_distance", "inception_score", "Evaluator",
    "evaluate", "make_evaluator", "inception_fid", "knn_radii", "manifold_metrics", "CheckpointError",
    "CheckpointWriteError", "checksum_path", "save_checkpoint", "prune_checkpoints", "load_checkpoint",
    "list_checkpoints", "latest_checkpoint", "latest_good_checkpoint", "save_history", "load_generator", "image_grid",
    "plot_images", "plot_label_grid", "plot_grid_evolution", "plot_losses", "plot_partition", "draw_checkpoint_samples",
    "browse_checkpoints", "plot_metrics", "plot_per_class_accuracy", "plot_metric_curves", "plot_lines",
    "plot_seed_spread", "plot_class_heatmap", "plot_sample_grids", "plot_tradeoff", "save_round_grids", "save_grid_gif",
]
