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

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff check . && ruff format --check .

bench:
	$(PYTHON) benchmarks/fit_throughput.py
	$(PYTHON) benchmarks/sweep_throughput.py
	$(PYTHON) benchmarks/cores.py
