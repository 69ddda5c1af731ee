"""Registered custom ops (torch.library) per backend, with fake functions and the public
autograd Functions. Importing this package registers everything that this build has."""
from . import bias_dropout  # noqa: F401
from . import optim  # noqa: F401
