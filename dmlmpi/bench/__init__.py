"""`python -m dmlmpi.bench KIND ...`: measured tables, side by side with the peers, in one run."""
