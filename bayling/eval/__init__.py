"""Evaluation toolkit: BayLing-80 answers, translation, exams, pairwise judging (python -m bayling.eval)."""
