collect_ignore = ["plugin_cases"]


def pytest_configure(config):
    """Register this suite's markers."""
    config.addinivalue_line("markers", "mpi: runs at every world size (the multi-rank suites select it)")
