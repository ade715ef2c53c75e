# Two commands: `make demo` trains a model on the bundled Shakespeare, `make test` runs every test.
# Both create .venv when missing; torch is pinned first by constraints.txt (a local CPU wheel on CI).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo chat-demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nomoat demo

chat-demo: $(STAMP)
	$(BIN)/nomoat run chat-demo

test: $(STAMP)
	$(BIN)/ruff check nomoat tests benchmarks scripts
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) runs
