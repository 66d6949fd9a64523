"""nn.Modules that hold parameters and call the divattn ops (no kernel code here)."""

from .attention import Attention
from .divided import DividedSpaceTimeAttention, add_after_first
from .drop import DropPath, drop_path

__all__ = ["Attention", "DividedSpaceTimeAttention", "DropPath", "add_after_first", "drop_path"]
