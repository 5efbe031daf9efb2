# Two commands do everything on a fresh machine: `make run` and `make test`.
# Both create .venv and install what is missing (once; re-done when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS   ?=

.PHONY: install run test mutation clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch/torchvision first: pip takes them from this machine's disk (pinned, CUDA build, runs on CPU too).
	$(BIN)/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(BIN)/python run.py $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

# Mutation score of the numeric and cache core (README, development notes); not part of CI.
mutation: install
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,mutation]"
	$(BIN)/mutmut run --max-children 2 ; $(BIN)/mutmut results > mutmut-results.txt; tail -5 mutmut-results.txt

clean-outputs:
	rm -rf outputs multirun
