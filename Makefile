# Every target builds its own virtual environment from nothing but python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-full bench lint typecheck fuzz clean lab native pure

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The hot modules compiled with mypyc (docs/performance.md); where that cannot be done it says so and
# the Python source runs.  Incremental: nothing is rebuilt while the sources match the last build.
native: $(STAMP)
	$(BIN)/python -m kvmmu.tools.native build

# Back to the Python source only (KVMMU_PURE=1 does the same for one run).
pure:
	$(BIN)/python -m kvmmu.tools.native clean

demo: native
	$(BIN)/kvmmu demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# mypy holds the whole package clean (pyproject.toml [tool.mypy]): every definition annotated.
TYPED := src/kvmmu
typecheck: $(STAMP)
	$(BIN)/mypy $(TYPED)

test: native lint typecheck
	$(BIN)/python -m pytest -n 2

test-full: native
	$(BIN)/python -m pytest -n 2 -m full

bench: native
	$(BIN)/python -m benchmarks

# The long fuzz profile (docs/reliability.md): FUZZ_SECONDS=600 make fuzz [FUZZ_SEED=n]
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz.long $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

clean:
	-$(BIN)/python -m kvmmu.tools.native clean
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache

# The nested real-KVM lab (docs/real-kvm.md): QEMU TCG + a stock Debian kernel's KVM.  Not part of
# `make test`.  Captures the corpus under each configuration into tests/realdiff/lab/ (the recorded
# observations `kvmmu real-diff --recorded` compares the model with).  LAB_CONFIGS narrows it.
LAB_CONFIGS ?= npt npt-legacy shadow
LAB_CORPUS  := tests/realdiff/corpus tests/realdiff/lab/scenarios
lab: $(STAMP)
	$(BIN)/kvmmu lab setup
	for c in $(LAB_CONFIGS); do \
	  $(BIN)/kvmmu lab real-diff $(LAB_CORPUS) --config $$c --save tests/realdiff/lab/$$c.json || true; \
	  $(BIN)/kvmmu lab real-diff tests/realdiff/lab/scenarios -k mmio64 --config $$c --no-mmio-caching \
	    --save tests/realdiff/lab/$$c-nommio.json || true; \
	done
	$(BIN)/python -m pytest -p no:xdist -m lab tests/lab
