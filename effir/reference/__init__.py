"""float64-capable torch references of every op, written once; tests and benchmarks import them."""
