"""The names of what a training run writes in its ``--out`` folder (see
:mod:`qn_keras.training.trainer`), shared by the trainer, ``--init`` discovery and the report."""

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best_model"  # inside CHECKPOINT_DIR: the best model so far, without a SavedModel
RUN_FILE = "run.json"  # resolved architecture, labels and front end (for resuming)
HISTORY_FILE = "history.json"
REPORT_FILE = "training_report.json"
CURVES_FILE = "curves.png"
MODEL_DIR = "model"
FEATURIZER_ARRAYS_FILE = "featurizer_arrays.npz"
