# Two commands set up everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MMKIT := $(VENV)/bin/mmkit
STAMP := $(VENV)/.installed
LMMS_STAMP := $(VENV)/.lmms-installed

.PHONY: run test test-fast setup clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	# torch first, from the pinned CPU wheel where the machine provides one.
	$(PY) -m pip install -q --no-cache-dir torch==2.13.0
	$(PY) -m pip install -q --no-cache-dir -r requirements.lock
	$(PY) -m pip install -q --no-cache-dir --no-deps -e .
	touch $(STAMP)

# lmms-eval, light: the tests run `python -m lmms_eval --model mmkit` on the mmkit tasks.
$(LMMS_STAMP): $(STAMP) requirements-lmms.lock scripts/install_lmms.sh
	bash scripts/install_lmms.sh
	touch $(LMMS_STAMP)

setup: $(STAMP)

run: $(STAMP)
	bash scripts/main_job.sh

test: $(STAMP) $(LMMS_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .venv-wheel runs
