# Every target builds its own virtual environment from nothing but python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-full bench lint fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvmmu demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -n 2

test-full: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m full

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# The long fuzz profile (docs/reliability.md): FUZZ_SECONDS=600 make fuzz [FUZZ_SEED=n]
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz.long $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
