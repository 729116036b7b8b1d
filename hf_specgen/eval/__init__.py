"""Speciality and generality scores: lm-evaluation-harness for LMs, distribution shift for CLIP."""
