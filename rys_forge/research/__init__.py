"""research: brute-force ground truth (sweep), and whether the rank score finds the good windows
(validate, calibrate).

Modules: :mod:`~rys_forge.research.sweep` (the ``sweep`` stage),
:mod:`~rys_forge.research.sweep_outputs` (its run folder, table, summary, heatmaps; unfinished sweeps reported),
:mod:`~rys_forge.research.sweep_rows` (a window's row from two lm-eval runs: kept metric, delta, z, verdict),
:mod:`~rys_forge.research.sweep_engine` (the cached engine: every window from one base pass),
:mod:`~rys_forge.research.validate` (rank score vs sweep outcomes), :mod:`~rys_forge.research.calibrate`
(fitting the score's constants), :mod:`~rys_forge.research.surrogate` (a score learned across models). Their statistics live in :mod:`rys_forge.stats`, their figures in
:mod:`rys_forge.plots`.
"""
