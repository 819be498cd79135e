# make demo: set up .venv, write the sample digits, sweep 5 folds, test the best model.
# make test: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install data demo test lint clean-runs

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

data: install
	$(PY) -m src.sample_data --out data

demo: data
	$(PY) train.py -m experiment=sample fold=0,1,2,3,4
	$(PY) test.py ckpt=models:/resnet18_classifier@champion

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
