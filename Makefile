# Set-up is part of every target: a virtual environment in .venv with the pinned requirements,
# rebuilt only when requirements.txt or pyproject.toml changes; the package is installed editable.
PYTHON ?= python3
BIN := .venv/bin

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv .venv
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .  # magneto_dist importable anywhere
	touch $@

.PHONY: train test test-fast
train: $(BIN)/.installed  ## the default pretraining run (ARGS="train.train_iters=50 ..." to override)
	$(BIN)/deepspeed launch/pretrain_gpt.py $(ARGS)

# Test modules run on JOBS pytest-xdist workers, a module's tests on one worker (loadscope: a
# module's fixtures, such as the layout table's batched ranks, are built once); runs shared
# across modules are built once between the workers (tests/dist/conftest.py).
JOBS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope

test: $(BIN)/.installed   ## the whole test suite (ARGS="-k resume" to select, JOBS=4 on more cores)
	$(PYTEST) $(ARGS)

test-fast: $(BIN)/.installed  ## the quick loop: the single-process tests (tests/dist's ranks left out)
	$(PYTEST) -m "not slow" --ignore=tests/dist $(ARGS)
