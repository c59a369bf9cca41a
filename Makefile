# entropy-probe: `make demo` runs the main job, `make test` the tests.
# Both create .venv and install what a fresh machine lacks. TORCH_SPEC is overridable,
# e.g. `make test TORCH_SPEC='torch==2.5.1'`; on our CI machines torch==2.13.0 is the local CPU build.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
DEMO_OUT   ?= runs/demo
PYTEST_ARGS ?= -n 2

.PHONY: install test lint format demo demo-guard validate bench mutants clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

LINTED     := src tests benchmarks examples

test: $(STAMP) lint
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

format: $(STAMP)
	$(PY) -m ruff check --fix $(LINTED)
	$(PY) -m ruff format $(LINTED)

demo: $(STAMP)
	$(VENV)/bin/entropy-probe demo --out $(DEMO_OUT)

demo-guard: $(STAMP)
	$(VENV)/bin/entropy-probe demo-guard --out runs/demo_guard

validate: $(STAMP)
	$(VENV)/bin/entropy-probe validate --out runs/validate

bench: $(STAMP)
	$(PY) benchmarks/bench_engines.py

# Mutation testing on demand (not in CI): mutmut (pinned in the dev extras) mutates each module in
# MUTATE in place (it keeps a backup and restores it) and runs its fast tests per mutant; the kill rate
# is printed at the end (docs/mutation.md). Hours on 2 cores for both modules: run one at a time, e.g.
# `make mutants MUTATE=src/entropy_probe/statistics.py MUTANT_TESTS="tests/test_core_statistics.py"`.
MUTATE       ?= src/entropy_probe/statistics.py,src/entropy_probe/direction.py
MUTANT_TESTS ?= tests/test_core_statistics.py tests/test_interval.py::test_interval_covers_strongly_skewed_means \
                tests/test_interval.py::test_interval_api_levels_z_and_dict \
                tests/test_interval.py::test_student_t_quantile_matches_scipy tests/test_reliability.py \
                tests/test_core_direction.py tests/test_step_rules.py
# The tests must import the MUTATED files: the editable install (or a PYTHONPATH set elsewhere) points at
# some checkout's src/, so without PYTHONPATH=$(CURDIR)/src every mutant ran against unmutated code (an
# import-time mutant such as `inv_cdf(1.975)` survived). No .pyc is written: two mutants written within
# the same second with the same size could otherwise reuse a stale bytecode file. mutmut 2.5.1 counts
# only exit code 1 as "killed": a mutant that breaks the import ends pytest with 2 (collection error) and
# was counted as survived, hence `|| exit 1`.
MUTANT_ENV := PYTHONPATH=$(CURDIR)/src PYTHONDONTWRITEBYTECODE=1
mutants: $(STAMP)
	$(MUTANT_ENV) $(PY) -c "import entropy_probe as e, sys; \
		sys.exit(0 if e.__file__.startswith('$(CURDIR)/src/') else 'entropy_probe imported from ' + e.__file__)"
	-$(MUTANT_ENV) $(PY) -m mutmut run --paths-to-mutate $(MUTATE) --no-progress \
		--runner "bash -c '$(PY) -m pytest -x -q -p no:cacheprovider -n 0 $(MUTANT_TESTS) || exit 1'"
	$(PY) -m mutmut results
	$(PY) benchmarks/mutation_score.py .mutmut-cache

clean:
	rm -rf $(VENV) runs .pytest_cache
