"""fusedopt: fused multi-tensor optimizers for PyTorch (CPU and CUDA), with bf16 precision
paths. ``from fusedopt import AdamW`` in place of ``torch.optim.AdamW``."""
from ._version import __version__
from .adam import Adam, AdamW
from .sgd import SGD
from . import functional
from ._config import show_config
from . import schedules, averaging
from ._param_groups import param_groups

__all__ = ["Adam", "AdamW", "SGD", "functional", "show_config", "__version__", "schedules", "averaging", "param_groups"]
from .muon import Muon, muon_param_groups

__all__ += ["Muon", "muon_param_groups"]
