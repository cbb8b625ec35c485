import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache (built-in corpus, index caches) for every end-to-end run of a session."""
    return str(tmp_path_factory.mktemp("data_cache"))
