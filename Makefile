# Two commands on a fresh machine:  `make run`  (the main notebook, headless)  and  `make test`.
# Each creates .venv and installs requirements.txt when they are missing or changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NOTEBOOK := Federated_conditional_DCGAN.ipynb
# MNIST: $FEDGAN_DATA if set, else the shared read-only copy beside the repo when there is one
export FEDGAN_DATA ?= $(wildcard $(abspath ../shared/data/MNIST))

.PHONY: run test notebooks flower clean-venv

$(BIN)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

# Execute the first notebook top to bottom (preset: $FEDGAN_PRESET, else full on a GPU, cpu otherwise);
# the executed copy lands in outputs/ under a name of its own (an earlier run's is kept), its plots in
# outputs/<run name>/, checkpoints in checkpoints/<run name>/.
run: $(BIN)/.installed
	mkdir -p outputs
	name=$(basename $(NOTEBOOK))-$$(date +%Y%m%d-%H%M%S).ipynb && \
	$(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
		--output-dir outputs --output $$name $(NOTEBOOK) && \
	echo "Executed notebook: outputs/$$name"
	@echo "Plots and tables:  outputs/<run name>/ (the notebook prints it)   Checkpoints: checkpoints/<run name>/"

# Unit tests, then every notebook re-executed by nbval at the smoke preset.
test: $(BIN)/.installed
	FEDGAN_PRESET=smoke $(BIN)/python -m pytest

# Re-execute the three notebooks in place (to commit them with the outputs of a real run).
notebooks: $(BIN)/.installed
	for nb in Federated_conditional_DCGAN.ipynb Deep_Federated_Generative_Models__FedGAN_v2_kaggle_run.ipynb \
		FedGAN_Custom_sync_strategy.ipynb; do \
		$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=-1 $$nb || exit 1; \
	done

# The federation on a real local Flower deployment (a SuperLink and 3 SuperNodes on loopback) at the smoke preset;
# a new folder a run: the launcher never writes into one that holds a run (docs/flower.md).
flower: $(BIN)/.installed
	$(BIN)/python -m fedgan.flower --config examples/flower_smoke.json --supernodes 3 \
		--out outputs/flower-smoke-$$(date +%Y%m%d-%H%M%S)

clean-venv:
	rm -rf $(VENV)
