"""Local training of a round's clients, all at once: the boundary below which the clients are batched.

Above it, a round's clients are a RoundPlan and stacked states in, stacked states and losses out
(train_clients). Below it: the clients' parameters as one flat tensor each and a stacked Adam (stacked.py),
vmap or a loop or CUDA streams over the clients (trainer.py), CUDA graphs (graphs.py), the forms of the
thin convolutions (convolutions.py, triton_conv.py) and bfloat16 compute (precision.py). reference.py computes the
same round as a plain loop, one client after another (client_map="reference"). The engine knows nothing of the
federation: it imports config, data, models, gan, aggregation and rounds, and nothing that imports it.
"""
