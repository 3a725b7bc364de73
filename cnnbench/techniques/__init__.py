"""Techniques that change a trained model: one module each (a plain function that does the work),
plus :mod:`cnnbench.techniques.compress`, the thin hook the runner calls."""
