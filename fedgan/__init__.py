"""A federated conditional DCGAN: the package behind the three FedGAN notebooks, one concept a module.

Reading order, from what a round does down to how it is computed fast:

    config.py        FedConfig: every knob of a run, validated; the presets
    data.py          datasets as uint8 tensors, found on disk before any download
    partition.py     IID and non-IID splits of the data over clients
    models.py        the conditional DCGAN's generator and discriminator
    gan.py           what a client computes in a local step: (1) update D, (2) update G
    rounds.py        planning a round: clients, local steps, batches, noise, stragglers, attackers
    aggregation.py   pure functions of client states: FedAvg, robust rules, FedNova, staleness
    strategies.py    server rules that keep state between rounds (FedAvgM, FedAdam, thresholds)
    compression.py   what clients send: float32, top-k, int8
    uploads.py       a client's upload: its update, poisoned if it attacks, error feedback, compressed
    privacy.py       DP-FedAvg's clip and noise, and its accountant
    scaffold.py      SCAFFOLD's control variates: the drift correction of the clients' gradients
    watchdog.py      a run that diverged or collapsed stops with a clear message
    multi_discriminator.py  one G at the server, a D a client, nothing averaged: MD-GAN, UA-GAN, F2U, F2A
    federation.py    Federation: the round loop
    experiments.py   ablation grids, seeds, the centralized baseline
    cell_store.py    a grid's finished cells on disk: a stopped grid resumes at its first unfinished cell
    metrics.py       FID, KID, IS, conditional accuracy in a classifier's features
    checkpoints.py   atomic, checksummed, weights_only checkpoints
    plots.py         figures and the checkpoint browser
    engine/          local training of all selected clients at once: the only place that knows how
                     clients are batched (vmap, CUDA streams and graphs, Triton convolutions);
                     engine/reference.py is the same round written as a plain loop over the clients
                     (engine/discriminators.py: the clients' own Ds of the multi-discriminator layouts)
    flower/          the same federation as a Flower App on real SuperLink and SuperNode processes
                     (an optional extra: the only place flwr is imported)

environment.py (devices, seeds), checks.py (argument checks) and digests.py (what names a stored result) serve
them all. The notebooks import the public names through `fedgan_utils`, the flat helper at the top of the
repository.
"""
