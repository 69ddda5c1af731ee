"""The public autograd Functions, one per op, each over that op's registered custom ops."""
from .ops.batch_norm import BatchNormConfig, BatchNormFunction, SyncBatchNormFunction
from .ops.bias_dropout import BiasDropoutConfig, BiasDropoutFunction
from .ops.layer_norm import LayerNormConfig, LayerNormFunction

__all__ = ["BatchNormConfig", "BatchNormFunction", "BiasDropoutConfig", "BiasDropoutFunction",
           "LayerNormConfig", "LayerNormFunction", "SyncBatchNormFunction"]
