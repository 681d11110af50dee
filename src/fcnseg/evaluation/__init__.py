"""Evaluation: metrics from one confusion matrix, the one evaluation loop, scoring a checkpoint, the precision
gate and speed benchmarks."""
