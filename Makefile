# Every target builds its own virtual environment from nothing but python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-full bench lint typecheck fuzz clean lab

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvmmu demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# The packages mypy holds clean (pyproject.toml [tool.mypy]); docs/ARCHITECTURE.md lists the rest.
TYPED := src/kvmmu/report src/kvmmu/sim src/kvmmu/sweep src/kvmmu/lab src/kvmmu/cli.py src/kvmmu/cliargs.py \
         src/kvmmu/errors.py src/kvmmu/bits.py src/kvmmu/vmm \
         src/kvmmu/real src/kvmmu/arch src/kvmmu/hw \
         src/kvmmu/kvm/emulate.py src/kvmmu/kvm/soft_emulator.py src/kvmmu/kvm/emulate_retry.py \
         src/kvmmu/kvm/profiles.py src/kvmmu/kvm/profiles_svm.py src/kvmmu/kvm/cpu_bus.py
typecheck: $(STAMP)
	$(BIN)/mypy $(TYPED)

test: $(STAMP) lint typecheck
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
