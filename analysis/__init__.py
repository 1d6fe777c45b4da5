"""analyze.py's parts: the stage and essential-dynamics math (stages.py), what is measured at a
regression checkpoint (metrics.py, regression.py), a run's rows as tables (tables.py), the figures
(plots.py), the susceptibilities' columns and figures (susceptibility.py); and llc.py's named
restriction sets (restrictions.py) and sampler calibration grid (calibration.py)."""
