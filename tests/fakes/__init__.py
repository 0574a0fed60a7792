"""Real local stand-ins for outside systems (model providers), used by tests and benchmarks."""
