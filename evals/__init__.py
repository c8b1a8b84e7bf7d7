"""evals: score a model on math and code benchmarks; owns the graders that `filter` reuses."""
