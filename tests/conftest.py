collect_ignore = ["plugin_cases"]


def pytest_configure(config):
    """Register this suite's markers; list the slowest tests at the end (CI must stay well under 30 min)."""
    config.addinivalue_line("markers", "mpi: runs at every world size (the multi-rank suites select it)")
    if getattr(config.option, "durations", None) is None:
        config.option.durations = 15
