"""Activation names accepted by the fused ops and their integer codes in the op schemas.

The codes match ``fusedreg::Activation`` in csrc/include/fusedreg/activation.h.
"""
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
NAMES = {code: name for name, code in ACTIVATIONS.items()}


def activation_code(activation):
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        valid = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"unknown activation {activation!r}; expected one of {valid}") from None
