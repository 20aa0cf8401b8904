collect_ignore = ["plugin_cases"]


def pytest_configure(config):
    """Register this suite's markers; list the slowest tests at the end (CI must stay well under 30 min)."""
    config.addinivalue_line("markers", "mpi: runs at every world size (the multi-rank suites select it)")
    # a deprecation that dmlmpi's own code triggers fails its test: the next numpy or torch would break it
    config.addinivalue_line("filterwarnings", "error::DeprecationWarning:dmlmpi")
    if getattr(config.option, "durations", None) is None:
        config.option.durations = 15
