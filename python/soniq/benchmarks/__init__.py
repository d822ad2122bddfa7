"""Benchmarks shipped with the package (`soniq bench cpu|gpu`). They print and save JSON +
markdown with ratios against baselines measured in the same process; nothing here is a test."""
