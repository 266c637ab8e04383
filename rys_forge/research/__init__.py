"""research: brute-force ground truth (sweep), and whether the rank score finds the good windows
(validate, calibrate)."""
