# The two commands: `make run` serves on 127.0.0.1:8000, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build to install first. Any CUDA or CPU build >= 2.4 works; override e.g.
# `make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
# Two test processes (one per core); each test file runs whole in one of them.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: run test check clean browser

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/fluxserve serve

test: check browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Static checks: ruff's rule set and mypy (both configured in pyproject.toml).
check: $(BIN)/.installed
	$(BIN)/ruff check fluxserve tests bench
	$(BIN)/mypy

# Debian's Chromium, for the playground's browser test (which skips, saying why, when it is missing).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "chromium could not be installed: the browser test will be skipped"

clean:
	rm -rf $(VENV) .fluxserve .pytest_cache
