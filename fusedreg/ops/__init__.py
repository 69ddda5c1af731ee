"""Registered custom ops (torch.library) per backend, with fake functions and the public
autograd Functions. Importing this package registers everything that this build has."""
from . import bias_dropout, layer_norm, optim  # noqa: F401  (each registers its op)
from . import batch_norm  # noqa: F401,E402
