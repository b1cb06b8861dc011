# The two commands a newcomer types: `make demo` and `make test`. Each builds .venv first if it is missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	touch $(STAMP)

# The main job: train configs/demo.yaml on the built-in shapes data, evaluate it, write its report.
# A fresh run each time: `resnetkit train` refuses to start over a run folder that already holds last.pt.
demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/resnetkit train --config configs/demo.yaml
	$(VENV)/bin/resnetkit eval --checkpoint runs/demo/best.pt --out runs/demo/eval
	$(VENV)/bin/resnetkit report runs/demo
	@echo "demo outputs: runs/demo/ (curves.png, eval/, report.html)"

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
