# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
# Both create .venv and install the project with the model stack (torch==2.14.1, torchvision==0.29.1).

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[worker,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bigmodel demo

test: $(STAMP)
	$(VENV)/bin/pytest

# Needs Redis and PostgreSQL as for `make test`; BENCH_ARGS="--quick" for a two-minute run.
bench: $(STAMP)
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .bigmodel .pytest_cache
