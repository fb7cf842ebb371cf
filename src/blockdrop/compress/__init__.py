"""The compression engine: Progressive Block Drop of any model with a stack of residual blocks.

`compress_model` is the one entry point from Python; `FeatureTarget` compresses a model without a
task head; `History` is the typed run record. The parts: stack (find / drop blocks), saving,
target (the protocol), selection, lora, align, rules, progressive (the loop), history, width.
"""

from blockdrop.compress.api import compress_model
from blockdrop.compress.history import History
from blockdrop.compress.target import FeatureTarget

__all__ = ["FeatureTarget", "History", "compress_model"]
