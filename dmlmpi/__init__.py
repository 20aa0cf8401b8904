"""dmlmpi: data, pipeline and federated parallel training on plain MPI."""

__version__ = "0.1.0"
