"""Evaluation: FSC, map alignment, pose error."""
