"""fusedopt: fused multi-tensor optimizers for PyTorch (CPU and CUDA), with bf16 precision
paths. ``from fusedopt import AdamW`` in place of ``torch.optim.AdamW``."""
from ._version import __version__
from .adam import Adam, AdamW
from .sgd import SGD
from .lion import Lion
from .schedulefree import AdamWScheduleFree, SGDScheduleFree
from .muon import Muon, muon_param_groups
from .sam import SAM
from . import functional
from ._config import show_config
from . import schedules, averaging, sharpness
from ._param_groups import param_groups
from ._quantization import dequantize_state_dict

__all__ = ["Adam", "AdamW", "SGD", "Lion", "AdamWScheduleFree", "SGDScheduleFree", "Muon", "muon_param_groups",
           "SAM", "functional", "show_config", "__version__", "schedules", "averaging", "sharpness", "param_groups",
           "dequantize_state_dict"]
