# kl-sweep: `make demo` installs, runs the default study sweep and charts it; `make test` runs the tests.
PYTHON ?= python
SWEEP_DIR ?= multirun/latest

.PHONY: install demo sweep analysis test lint bench

install:
	@# torch first, pinned to the CPU build this machine has (a bare `torch` pulls GPU packages).
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"

sweep:
	$(PYTHON) -m kl_sweep -m experiment=study

analysis:
	$(PYTHON) -m analysis $(SWEEP_DIR)

demo: install sweep analysis
	@echo "Table:   $(SWEEP_DIR)/results.parquet"
	@echo "Figures: $(SWEEP_DIR)/figures/"
	@echo "Tables:  $(SWEEP_DIR)/tables/"

# Test files run in as many worker processes as there are cores (pytest-xdist, one file per worker,
# so module fixtures run once), each torch process on one thread unless OMP_NUM_THREADS says otherwise.
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) -m pytest -q -n auto --dist loadfile

lint:
	ruff check . && ruff format --check .

bench:
	$(PYTHON) benchmarks/fit_throughput.py
	$(PYTHON) benchmarks/sweep_throughput.py
	$(PYTHON) benchmarks/cores.py
	$(PYTHON) benchmarks/pages.py
	$(PYTHON) benchmarks/registry_throughput.py
