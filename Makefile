PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install test test-all demo

install:
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	$(PYTHON) -c "from detr_irpe.irpe import native; raise SystemExit(native.build())" || true

test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

test-all: install
	$(PYTHON) -m pytest -q -m ""

demo: install
	$(PYTHON) tools/demo.py
