"""Evaluation: metrics over a whole split, the run report, Grad-CAM explanations."""
