"""Data formatting shared by training, evaluation and the recipes."""
