"""analyze.py's parts: the stage and essential-dynamics math (stages.py), what is measured at a
checkpoint (metrics.py), a run's rows as tables (tables.py), the figures (plots.py); and llc.py's
sampler calibration grid (calibration.py)."""
