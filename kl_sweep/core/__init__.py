"""The numerical core: mixtures, estimators, divergences, optimisers, the batched fit and continuation.

Nothing here knows about Hydra, files or the command line; the plumbing around it (config, CLI,
sweep, I/O) lives beside it in :mod:`kl_sweep`.
"""
