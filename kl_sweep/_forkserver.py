"""Imported first by joblib's forkserver (:data:`kl_sweep.workers.PRELOAD`), and only there: it
makes that process end without tearing torch down (:func:`kl_sweep.shutdown.exit_quickly`)."""

from kl_sweep.shutdown import exit_quickly

exit_quickly()
