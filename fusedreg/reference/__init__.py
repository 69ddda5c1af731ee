"""Pure-PyTorch implementations: the specification and the test oracle of every op."""
