"""Benchmarks: one module per `llmrec bench NAME`, each against the reference it must beat; imported only by the CLI."""
