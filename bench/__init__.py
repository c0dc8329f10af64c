"""Benchmarks (run as modules: `./scripts/harness bench.p1_text_to_image`). weights: the random full-size weight
set; measure: in-worker timing and memory, quiet-machine gating, worker processes; report: statistics and tables."""
