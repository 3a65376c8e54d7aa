# The two commands: `make run` serves on 127.0.0.1:8000, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build to install first. Any CUDA or CPU build >= 2.4 works; override e.g.
# `make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
# Two test processes (one per core); each test file runs whole in one of them.
PYTEST_ARGS ?= -n 2 --dist loadfile
# The inner loop: everything but the multi-process drills, the browser, the deploy files and torch.compile.
FAST_MARKERS := not drill and not browser and not deploy and not compile

.PHONY: run test test-fast check clean browser postgres redis

# What `make run` needs (the service) and, on top of it, what `make test` needs (the test extra):
# each installed once, and again when pyproject.toml changes. `make run` skips pip's byte-compiling of
# every file (half the install time; Python compiles what it imports). The tests start dozens of
# processes, so `make test` byte-compiles the whole venv once, on every core: where the environment says
# PYTHONDONTWRITEBYTECODE, nothing else would, and each process would compile torch from source again.
# (-qq: a few packages ship files for newer Pythons on purpose; those are skipped, as pip skips them.)
PIP_INSTALL := $(BIN)/python -m pip install -q --no-compile

$(BIN)/.runtime: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(TORCH_SPEC)
	$(PIP_INSTALL) -e .
	touch $@

$(BIN)/.installed: $(BIN)/.runtime
	$(PIP_INSTALL) -e '.[test]'
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

run: $(BIN)/.runtime
	$(BIN)/fluxserve serve

test: check browser postgres redis
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# In-process tests, the stores and the engine, in about two minutes; `make test` (CI) still runs everything.
test-fast: $(BIN)/.installed postgres redis
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "$(FAST_MARKERS)"

# Static checks: ruff's rule set and mypy (both configured in pyproject.toml).
check: $(BIN)/.installed
	$(BIN)/ruff check fluxserve tests bench
	$(BIN)/mypy

# Debian's Chromium, for the playground's browser test (which skips, saying why, when it is missing).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "chromium could not be installed: the browser test will be skipped"

# PostgreSQL for the PostgreSQL stores' tests: they use the server on 127.0.0.1:5432 when it answers,
# else start a private one with Debian's initdb/pg_ctl (and skip, saying why, when neither is there).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null \
		|| (echo "no PostgreSQL for the tests: installing Debian's postgresql" && apt-get update -qq \
			&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) \
		|| echo "postgresql could not be installed: the PostgreSQL tests will be skipped"

# Redis for the Redis stores' tests: the server on 127.0.0.1:6379 when it answers, else one they start.
redis:
	@command -v redis-server >/dev/null \
		|| (echo "no redis-server for the tests: installing Debian's redis-server" && apt-get update -qq \
			&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) \
		|| echo "redis-server could not be installed: the Redis tests will be skipped"

clean:
	rm -rf $(VENV) .fluxserve .pytest_cache
