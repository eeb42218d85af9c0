"""fedgan on Flower: the federation of a FedConfig as a Flower App (ServerApp, ClientApp) on real SuperLink and
SuperNode processes, computing what the simulation computes. Needs the optional extra: pip install .[flower].

node.py (a client's round on a SuperNode) and remote.py (the server's round) hold the arithmetic and import no
flwr; messages.py, client_app.py and server_app.py carry it over Flower; launcher.py runs a local deployment.
"""
