import pytest

from .gpt_runs import check_ok
from .ranks import once, run_ranks


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache (built-in corpus, index caches) for every end-to-end run of a session."""
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """shared_run(make_args, ranks) -> the directory of the run `make_args(run_dir)` on `ranks`
    ranks, trained once per session and handed to every test (of any file) that asks for the
    same arguments: the straight runs that resume, reshard, export, evaluate and launcher tests
    compare with or start from. The run must succeed. Tests only read it: one that writes (a
    resume, an evaluation's rows) works on a copy of what it needs."""
    runs = {}

    def get(make_args, ranks, timeout=300):
        def train():
            run_dir = tmp_path_factory.mktemp("shared_run")
            check_ok(run_ranks(make_args(run_dir), ranks, timeout=timeout))
            return run_dir
        return once(runs, (tuple(map(str, make_args("RUN_DIR"))), ranks), train)
    return get
