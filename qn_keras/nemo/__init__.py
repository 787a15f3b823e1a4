"""Import NVIDIA NeMo QuartzNet / Jasper checkpoints (``.nemo``) into qn_keras models.

``import_nemo(path)`` returns a :class:`qn_keras.model_dir.ModelBundle` whose outputs match
NeMo's (spec section 4: `.nemo` layout, parameter names and shapes, Keras layouts). Reading
the weights needs PyTorch, the optional ``nemo`` extra; nothing else here does.
"""

from qn_keras.nemo.archive import read_nemo
from qn_keras.nemo.config import NemoImportError, NemoModelSpec, parse_model_config
from qn_keras.nemo.importer import choose_era, convert, import_nemo
from qn_keras.nemo.weights import expected_state_dict, load_nemo_weights, weight_plan

__all__ = [
    "NemoImportError",
    "NemoModelSpec",
    "choose_era",
    "convert",
    "expected_state_dict",
    "import_nemo",
    "load_nemo_weights",
    "parse_model_config",
    "read_nemo",
    "weight_plan",
]
