"""The public autograd Functions, one per op, each over that op's registered custom ops."""
from .ops.bias_dropout import BiasDropoutFunction

__all__ = ["BiasDropoutFunction"]
from .ops.layer_norm import DropoutAddLayerNormFunction, LayerNormFunction, RMSNormFunction

__all__ += ["DropoutAddLayerNormFunction", "LayerNormFunction", "RMSNormFunction"]
