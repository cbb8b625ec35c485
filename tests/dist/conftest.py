import hashlib
import os
import shutil

import pytest

from magneto_dist.files import build_lock

from .gpt_runs import check_ok
from .ranks import run_ranks


def session_root(tmp_path_factory):
    """The folder a whole test session shares. Under pytest-xdist (make test) every worker has
    its own basetemp, all in one parent: the data cache and the shared runs live there, so the
    two workers build each once between them instead of once each."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache (built-in corpus, index caches) for every end-to-end run of a session;
    concurrent runs build into it under the project's own build locks."""
    path = session_root(tmp_path_factory) / "data_cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """shared_run(make_args, ranks) -> the directory of the run `make_args(run_dir)` on `ranks`
    ranks, trained once per session and handed to every test (of any file, on any worker) that
    asks for the same arguments: the straight runs that resume, reshard, export, evaluate and
    launcher tests compare with or start from. The run must succeed; a failure is kept and
    raised again to each test that asks, never retried. Tests only read it: one that writes (a
    resume, an evaluation's rows) works on a copy of what it needs."""
    root = session_root(tmp_path_factory) / "shared_runs"
    root.mkdir(exist_ok=True)

    def get(make_args, ranks, timeout=300):
        key = repr((tuple(map(str, make_args("RUN_DIR"))), ranks))
        run_dir = root / hashlib.sha256(key.encode()).hexdigest()[:16]
        done, failed = run_dir.with_suffix(".done"), run_dir.with_suffix(".failed")
        with build_lock(f"{run_dir}.lock"):  # the other worker waits for the same run here
            if failed.exists():
                raise AssertionError(failed.read_text())
            if not done.exists():
                shutil.rmtree(run_dir, ignore_errors=True)  # a run cut short by a killed worker
                run_dir.mkdir()
                try:
                    check_ok(run_ranks(make_args(run_dir), ranks, timeout=timeout))
                except AssertionError as error:
                    failed.write_text(str(error))
                    raise
                done.touch()
        return run_dir
    return get
