"""Studies that use every stage: CounterFact-style edit benchmarks on real models."""
