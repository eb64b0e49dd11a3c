"""tritonlstm: a fused Triton LSTM for PyTorch."""

from tritonlstm.configs import LSTMConfig, use_config
from tritonlstm.functional import fused_lstm, synchronize
from tritonlstm.modules import LSTM, LSTMCell, convert
from tritonlstm.tuning import tune  # `python -m tritonlstm.tune` is its command line

__version__ = "0.1.0"
__all__ = ["LSTM", "LSTMCell", "LSTMConfig", "convert", "fused_lstm", "synchronize", "tune", "use_config",
           "__version__"]
