# make demo: set up .venv, write the sample digits, sweep 5 folds, test their fold ensemble (the champion).
# make demo-pipeline: the same through the dvc.yaml pipeline, as one DVC experiment.
# make test: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install data demo demo-pipeline figures test lint clean-runs

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -r requirements.txt -r requirements-dev.txt
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

# params.yaml is set up for your own images; these values give the pipeline conf/experiment/sample.yaml's
# settings instead (tests/test_dvc.py checks that they compose to the same config). `dvc exp run` writes them
# into params.yaml and records the experiment; `git checkout params.yaml` returns to your own settings.
SAMPLE_PARAMS := -S "train.overrides='experiment=sample'" -S train.freeze_backbone=false -S train.image_size=32 \
	-S train.batch_size=64 -S train.epochs=5

demo-pipeline: data
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc exp run $(SAMPLE_PARAMS)

# README pictures: the error analysis of the champion that `make demo` trained on the digits.
figures: install
	$(PY) -m src.analysis models:/resnet18_classifier@champion --out docs/what-went-wrong
	cp docs/what-went-wrong/top_losses.png docs/what-went-wrong/reliability.png docs/
	rm -r docs/what-went-wrong

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
