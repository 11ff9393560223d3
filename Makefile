# The two quick-start commands:  make demo   and   make test
# Both create (or reuse) .venv, install torch==2.13.0 first, then the package.
PYTHON ?= python3
VENV   ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/brats-cnn demo --out demo_output

# pytest exits 5 when it collects no tests: report that as a failure, never as success.
test: $(STAMP)
	@$(BIN)/python -m pytest -n 2 -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; exit 1; fi; exit $$rc

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m ""

clean:
	rm -rf $(VENV) demo_output *.egg-info
