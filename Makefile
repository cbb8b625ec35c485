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

test: $(BIN)/.installed   ## the whole test suite (ARGS="-k resume" to select)
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(BIN)/.installed  ## the quick loop: the single-process tests (tests/dist's ranks left out)
	$(BIN)/python -m pytest -q -m "not slow" --ignore=tests/dist $(ARGS)
