"""Federated learning simulated on MPI rank groups (simulation.py) and its pure building blocks.

Pure (no MPI): aggregation strategies (strategy.py), client data partitioners (partition.py), round
planning (rounds.py), secure aggregation (secagg.py) and differential privacy (privacy.py).
"""
from dmlmpi.federated import partition
from dmlmpi.federated.partition import PARTITIONERS, dirichlet, iid, shards, stats
from dmlmpi.federated.simulation import FLConfig, Simulation
from dmlmpi.federated.strategy import (
    STRATEGIES, Bulyan, ClientResult, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Krum, Median, QFedAvg,
    Scaffold, Strategy, Sums, TrimmedMean, make, proximal_grad, proximal_term, scaffold_client_step, scaffold_new_control,
    sums_of,
)

__all__ = [
    "FLConfig", "Simulation", "partition",
    "PARTITIONERS", "dirichlet", "iid", "shards", "stats",
    "STRATEGIES", "Bulyan", "ClientResult", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedProx", "FedYogi", "Krum",
    "Median", "QFedAvg", "Scaffold", "Strategy", "Sums", "TrimmedMean", "make", "proximal_grad", "proximal_term",
    "scaffold_client_step", "scaffold_new_control", "sums_of",
]
