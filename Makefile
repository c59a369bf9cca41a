# entropy-probe: `make demo` runs the main job, `make test` the tests.
# Both create .venv and install what a fresh machine lacks, every package at the version pinned in
# constraints.txt (`make lock` refreshes the pins). TORCH_SPEC is overridable,
# e.g. `make test TORCH_SPEC='torch==2.5.1'`: torch and what it brings then come unpinned, the rest
# stays pinned. On our CI machines the pinned torch (2.13.0) is the local CPU build.
PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS := constraints.txt
TORCH_PIN   := torch==$(shell sed -n 's/^torch==//p' $(CONSTRAINTS))
TORCH_SPEC  ?= $(TORCH_PIN)
PY          := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
DEMO_OUT   ?= runs/demo
PYTEST_ARGS ?= -n 2

.PHONY: install lock test lint format demo demo-guard validate figures bench mutants clean

install: $(STAMP)

# With the pinned torch everything installs under the constraints. With another TORCH_SPEC, torch
# installs first, free, and the constraints lose every package already in the venv (torch and its
# own dependencies), so the two cannot conflict.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
ifeq ($(TORCH_SPEC),$(TORCH_PIN))
	$(PY) -m pip install -q -c $(CONSTRAINTS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
else
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip list --format=freeze | awk -F'==' 'function key(s) { s = tolower(s); gsub(/[-_.]+/, "-", s); \
	  return s } NR == FNR { have[key($$1)] = 1; next } /^#/ || !(key($$1) in have)' - $(CONSTRAINTS) \
	  > $(VENV)/constraints-without-torch.txt
	$(PY) -m pip install -q -c $(VENV)/constraints-without-torch.txt -e ".[dev]"
endif
	touch $(STAMP)

# Refresh constraints.txt: a fresh venv in a temporary folder, torch at TORCH_SPEC, the newest
# releases of everything else that pyproject.toml allows (`.[dev]`), frozen. A few minutes (it installs
# torch and the dev tools). Then `make test` and `make figures` on the new pins.
LOCK_VENV := /tmp/entropy-probe-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[dev]"
	{ echo "# Every runtime and dev dependency of entropy-probe, pinned; make install uses it (pip -c)."; \
	  echo "# Refreshed by make lock: a fresh venv, torch at TORCH_SPEC, the newest releases pyproject.toml allows."; \
	  echo "# Frozen $$(date -u +%F) with $$($(LOCK_VENV)/bin/python -V)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; \
	} > $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

LINTED     := src tests benchmarks examples

test: $(STAMP) lint
	$(PY) -m pytest -q $(PYTEST_ARGS) tests
	$(MAKE) --no-print-directory test-verl

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

# Re-run every command whose figures README.md and docs/*.md quote, one after the other, each writing
# its record to docs/records/ (--record) and its pictures to docs/: about 15 minutes on 2 idle CPU
# cores (the demo 1.5 min for each functional at each of 3 seeds, demo-guard 3, validate 2, the TRL
# examples 1), plus se_total_unseen (40 min on the loaded machine, 12 cases of 300 (U, E) pairs); the
# records of 2026-12-06 took 58 min on 2 cores shared with a dozen other jobs, the six demo runs of the
# two functionals alone 7-17 min each there (docs/demo.md quotes their runtime_s).
# Then `make test`: tests/test_doc_figures.py names every quote that no longer equals its record;
# `$(PY) tests/doc_figures.py --fix` rewrites those numbers (reread the prose around them).
figures: $(STAMP)
	$(VENV)/bin/entropy-probe demo --entropy token --seed 0 --out runs/demo_token_seed0 --record docs/records/demo_token_seed0.json
	$(VENV)/bin/entropy-probe demo --entropy token --seed 1 --out runs/demo_token_seed1 --record docs/records/demo_token_seed1.json
	$(VENV)/bin/entropy-probe demo --entropy token --seed 2 --out runs/demo_token_seed2 --record docs/records/demo_token_seed2.json
	$(VENV)/bin/entropy-probe demo --entropy sequence --seed 0 --out runs/demo_sequence_seed0 --record docs/records/demo_sequence_seed0.json
	$(VENV)/bin/entropy-probe demo --entropy sequence --seed 1 --out runs/demo_sequence_seed1 --record docs/records/demo_sequence_seed1.json
	$(VENV)/bin/entropy-probe demo --entropy sequence --seed 2 --out runs/demo_sequence_seed2 --record docs/records/demo_sequence_seed2.json
	$(PY) examples/demo_functionals_report.py docs/records/demo_token_seed?.json docs/records/demo_sequence_seed?.json \
	  --record docs/records/demo_functionals.json
	$(VENV)/bin/entropy-probe demo-guard --entropy sequence --out runs/demo_guard --record docs/records/demo_guard.json
	$(VENV)/bin/entropy-probe validate --out runs/validate --record docs/records/validate.json
	$(PY) examples/trl_grpo.py --out runs/trl_grpo --record docs/records/trl_grpo.json
	$(PY) examples/trl_entropy_control.py --out runs/trl_entropy_control --record docs/records/trl_entropy_control.json
	$(PY) examples/trl_large_steps.py --steps 30 --out runs/trl_large_steps --record docs/records/trl_large_steps.json
	$(PY) benchmarks/se_total_unseen.py --record docs/records/se_total_unseen.json
	cp runs/demo_token_seed0/demo.png runs/demo_token_seed0/entropy.png runs/demo_token_seed0/layers.png \
	  runs/demo_token_seed0/influence.png runs/demo_guard/demo_guard.png docs/
	cp runs/demo_sequence_seed0/entropy.png docs/entropy_sequence.png
	cp runs/trl_grpo/forecast_vs_measured.png docs/trl_grpo.png
	cp runs/trl_entropy_control/entropy_control.png docs/trl_entropy_control.png

bench: $(STAMP)
	$(PY) benchmarks/bench_engines.py

# Mutation testing on demand (not in CI): mutmut (pinned in the dev extras) mutates each module in
# MUTATE in place (it keeps a backup and restores it) and runs its fast tests per mutant; the kill rate
# is printed at the end (docs/mutation.md). Run one module at a time, with its own tests, from a copy of
# the checkout (docs/mutation.md has both commands and the last counts).
MUTATE       ?= src/entropy_probe/statistics.py
MUTANT_TESTS ?= tests/test_reliability.py::test_bootstrap_interval_is_finite_on_tiny_samples \
                tests/test_interval.py::test_student_t_quantile_matches_scipy tests/test_core_statistics.py \
                tests/test_interval.py::test_interval_api_levels_z_and_dict \
                tests/test_interval.py::test_interval_covers_strongly_skewed_means
# The tests must import the MUTATED files: the editable install (or a PYTHONPATH set elsewhere) points at
# some checkout's src/, so without PYTHONPATH=$(CURDIR)/src every mutant ran against unmutated code (an
# import-time mutant such as `inv_cdf(1.975)` survived). No .pyc is written: two mutants written within
# the same second with the same size could otherwise reuse a stale bytecode file. mutmut 2.5.1 counts
# only exit code 1 as "killed": a mutant that breaks the import ends pytest with 2 (collection error) and
# was counted as survived, hence `|| exit 1`. Each mutant's pytest runs in a fork of a server that has
# imported torch once (benchmarks/mutant_runner.py; the import cost more than the tests); a fork is
# killed, and counted as failed, after MUTANT_LIMIT s, and mutmut's own timeout is set above that.
MUTANT_ENV    := PYTHONPATH=$(CURDIR)/src PYTHONDONTWRITEBYTECODE=1
MUTANT_SOCKET := $(CURDIR)/.mutant-runner.sock
MUTANT_LIMIT  ?= 300
# The record of each module's run (docs/mutation.md quotes them; copy it back from the copy's docs/records).
MUTANT_RECORD_statistics := --record docs/records/mutants_statistics.json
MUTANT_RECORD_direction  := --record docs/records/mutants_direction.json
mutants: $(STAMP)
	$(MUTANT_ENV) $(PY) -c "import entropy_probe as e, sys; \
		sys.exit(0 if e.__file__.startswith('$(CURDIR)/src/') else 'entropy_probe imported from ' + e.__file__)"
	$(MUTANT_ENV) $(PY) benchmarks/mutant_runner.py serve $(MUTANT_SOCKET) --limit $(MUTANT_LIMIT) \
		> .mutant-runner.log 2>&1 & \
	for i in $$(seq 120); do [ -S $(MUTANT_SOCKET) ] && break; sleep 1; done; \
	$(MUTANT_ENV) $(PY) -m mutmut run --paths-to-mutate $(MUTATE) --no-progress \
		--test-time-base $$(( $(MUTANT_LIMIT) + 60 )) \
		--runner "bash -c '$(PY) benchmarks/mutant_runner.py run $(MUTANT_SOCKET) -- \
			-x -q -p no:cacheprovider -n 0 $(MUTANT_TESTS) || exit 1'"; \
	$(PY) benchmarks/mutant_runner.py stop $(MUTANT_SOCKET)
	$(PY) -m mutmut results
	$(MUTANT_ENV) $(PY) benchmarks/mutation_score.py .mutmut-cache $(MUTANT_RECORD_$(basename $(notdir $(MUTATE))))

clean:
	rm -rf $(VENV) $(VERL_VENV) runs .pytest_cache

# ---- verl: its own environment ------------------------------------------------------------------
# verl 0.9.1 pins transformers<5.11, the main environment does not: the verl tests (tests/verl_engine, which
# the main run leaves out) run in .venv-verl, built from the exact versions in constraints-verl.txt.
VERL_VENV  ?= .venv-verl
VERL_PY    := $(VERL_VENV)/bin/python
VERL_STAMP := $(VERL_VENV)/.installed
VERL_PINS  := constraints-verl.txt

.PHONY: install-verl test-verl lock-verl

install-verl: $(VERL_STAMP)

# cachetools, uvicorn, fastapi: verl 0.9.1's trainer (verl_ray's imports) needs them without declaring them
# (a GPU install gets them with vLLM)
VERL_TEST_DEPS := pytest cachetools uvicorn fastapi

# The pins are a complete, consistent set (pip freeze): installed as they are, without the resolver
# (--no-deps) and without compiling every module of ray and torch to bytecode (--no-compile): minutes less.
$(VERL_STAMP): pyproject.toml $(VERL_PINS)
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q --no-compile "$(TORCH_SPEC)"
	$(VERL_PY) -m pip install -q --no-compile --no-deps -r $(VERL_PINS)
	$(VERL_PY) -m pip install -q --no-compile --no-deps -e .
	$(VERL_PY) -m pip check
	touch $(VERL_STAMP)

# ENTROPY_PROBE_REQUIRE_VERL: a verl test that cannot import verl fails instead of being left out
test-verl: $(VERL_STAMP)
	ENTROPY_PROBE_REQUIRE_VERL=1 $(VERL_PY) -m pytest -q -p no:cacheprovider tests/verl_engine

# re-resolve verl's extra from scratch and write the exact versions to constraints-verl.txt
lock-verl:
	rm -rf .venv-verl-lock
	$(PYTHON) -m venv .venv-verl-lock
	.venv-verl-lock/bin/pip install -q "$(TORCH_SPEC)"
	.venv-verl-lock/bin/pip install -q -e ".[verl]" $(VERL_TEST_DEPS)
	{ sed -n '1,2p' $(VERL_PINS); .venv-verl-lock/bin/pip freeze --exclude-editable | grep -v '^entropy' \
	  | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > $(VERL_PINS).new
	mv $(VERL_PINS).new $(VERL_PINS)
	rm -rf .venv-verl-lock
