"""Analysis of a kl-sweep sweep: distinct optima, outcome classes, phase boundaries, figures and tables.

``python -m analysis SWEEP_DIR`` writes everything; in Python::

    from analysis.data import load_sweep
    from analysis.pipeline import analyse
    from analysis import figures

    result = analyse(load_sweep("multirun/latest"))
    figures.phase_diagram(result)  # a matplotlib Figure
    result.boundaries  # the phase-boundary table

The rules (same optimum, classes, boundaries) are in ``analysis/README.md`` and :mod:`analysis.classify`.
Rows of the alpha family (``divergence=alpha``) are analysed by :mod:`analysis.alpha`
(``analyse_alpha``: the onset of multistability and the exact folds against alpha).
"""
