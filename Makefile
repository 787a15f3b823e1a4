# The README's two commands: `make demo` and `make test`. Both set up .venv first (with the
# `dask` extra, so that the feature job's test on a local Dask cluster runs in `make test`, and
# the `lm` extra with KenLM's lmplz and build_binary, built from source into .venv/bin).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format clean test-nemo

setup: $(STAMP)

# Re-installs only when a requirements file or setup.py changes.
$(STAMP): requirements.txt requirements-dev.txt requirements-dask.txt requirements-lm.txt \
		requirements-litert.txt setup.py \
		tools/build_kenlm.sh
	@$(PYTHON) tools/check_python.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	CMAKE_POLICY_VERSION_MINIMUM=3.5 $(PY) -m pip install --quiet --disable-pip-version-check \
		-r requirements.txt -r requirements-dev.txt -r requirements-dask.txt -r requirements-lm.txt \
		-r requirements-litert.txt
	tools/build_kenlm.sh $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(PY) -m pip check
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint
	$(PY) -m pytest -q

# Parity of `qn import-nemo` with NVIDIA NeMo itself. NeMo lives in its own venv (.venv-nemo:
# numpy 2 and a newer protobuf than TensorFlow 2.15 accepts); .venv gets the `nemo` extra
# (CPU torch) to read checkpoints. NeMo saves random-weight models and its outputs on real
# clips (re-made only when the script or the NeMo install changes); pytest compares.
NEMO_VENV := .venv-nemo
NEMO_STAMP := $(NEMO_VENV)/.installed
NEMO_EXTRA_STAMP := $(VENV)/.nemo-extra
NEMO_PARITY := build/nemo_parity

$(NEMO_STAMP): tests/nemo/requirements.txt tests/nemo/constraints.txt
	@$(PYTHON) tools/check_python.py
	@test -x $(NEMO_VENV)/bin/python || $(PYTHON) -m venv $(NEMO_VENV)
	$(NEMO_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(NEMO_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-r tests/nemo/requirements.txt -c tests/nemo/constraints.txt
	@touch $(NEMO_STAMP)

$(NEMO_EXTRA_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[nemo]'
	$(PY) -m pip check
	@touch $(NEMO_EXTRA_STAMP)

$(NEMO_PARITY)/manifest.json: tests/nemo/make_nemo_reference.py $(NEMO_STAMP)
	$(NEMO_VENV)/bin/python tests/nemo/make_nemo_reference.py --out $(NEMO_PARITY)

test-nemo: setup $(NEMO_EXTRA_STAMP) $(NEMO_PARITY)/manifest.json
	QN_NEMO_PARITY_DIR=$(NEMO_PARITY) $(PY) -m pytest -q tests/nemo

demo: setup
	$(PY) -m qn_cli.demo

clean:
	rm -rf $(VENV) $(NEMO_VENV) $(NEMO_PARITY) runs
