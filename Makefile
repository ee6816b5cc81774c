# Two entry points: `make demo` (set-up + the main job) and `make test` (set-up + the test suite).
# Both create .venv when it is missing. TORCH_PIN pins the CPU wheel for dev and CI only;
# users installing the package get whatever torch they already have. TRITON_PIN likewise: the
# ahead-of-time compile tests read its ptxas, and 3.10 changes the FP-fusion default.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.9.0
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)" "$(TRITON_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

demo: venv
	$(BIN)/python -m immiscible_lab demo $(DEMO_ARGS)

bench: venv
	$(BIN)/python -m immiscible_lab.bench --quick

lint: venv
	$(BIN)/python -m ruff check .

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: venv lint
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
