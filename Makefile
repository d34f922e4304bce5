# prep: two commands on a fresh machine -- `make dataset` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RAW    ?= raw
OUT    ?= processed
SIZE   ?= 32
PREP   := $(BIN)/prep --workdir $(OUT)
STAMP  := $(VENV)/.installed

.PHONY: install dataset test verify-train report report-check bench clean distclean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "prep needs Python 3.11 or newer (found $$($(PYTHON) --version))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,train]'
	$(BIN)/python -m compileall -q pipeline  # as a regular install does: each command starts without compiling
	touch $@

# The whole pipeline on RAW; fills the bundled raw/ with the digits sample while it has no class
# folders (a RAW of your own without them is an error, not a folder of digits).
dataset: install
	@if [ -z "$$(find '$(RAW)' -mindepth 1 -maxdepth 1 -type d ! -name '.*' 2>/dev/null | head -n 1)" ]; then \
		if [ '$(RAW)' != raw ]; then \
			echo "RAW=$(RAW) holds no class folders (expected $(RAW)/<class>/<image>)" >&2; exit 1; fi; \
		$(PREP) sample digits '$(RAW)'; fi
	$(PREP) run '$(RAW)' --size $(SIZE)
	$(PREP) verify-train || { $(PREP) report; exit 1; }
	$(PREP) report

verify-train: install
	$(PREP) verify-train

# The HTML report ($(OUT)/report/index.html) and dataset card ($(OUT)/README.md) of what is in OUT.
report: install
	$(PREP) report

# The report as headless Chromium renders it, the whole page at 1280 px and at 390 px (a phone),
# to $(OUT)/report/screenshot-<width>.png; fails when the page is wider than the screen.
# Chromium is installed from Debian packages when missing.
report-check: report
	@command -v chromium >/dev/null || { echo "Installing chromium (apt-get)"; \
		$$([ "$$(id -u)" = 0 ] || echo sudo) sh -c 'apt-get update && apt-get install -y chromium'; }
	$(BIN)/python tests/report_check.py '$(OUT)/report/index.html' --widths 1280,390

test: install
	$(BIN)/python -m pytest -n 2 -q

# prep against the usual ways on a generated photo corpus; BENCH_ARGS="--per-class 20" for a smoke run.
bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf '$(OUT)' .pytest_cache bench/work

distclean: clean
	rm -rf $(VENV) *.egg-info
