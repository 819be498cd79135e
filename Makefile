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

# The sample is byte-for-byte what data.dvc records: `dvc commit` files it in the DVC cache, so `dvc status` is
# clean; where data.dvc records other data, it changes nothing and the note below says so.
data: install
	$(PY) -m src.sample_data --out data
	$(VENV)/bin/dvc commit --quiet data.dvc </dev/null || echo "note: data/ is not the data that data.dvc records; dvc pull fetches that"

demo: data
	$(PY) train.py -m experiment=sample fold=0,1,2,3,4
	$(PY) test.py ckpt=models:/resnet18_classifier@champion

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
