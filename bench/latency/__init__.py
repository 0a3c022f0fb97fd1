"""Latency-targeted allocation: per-node latency tables measured on a backend, a
multiple-choice knapsack over them, and the allocator plugin that closes the loop with a
measurement of the cut model (``allocation.target=speedup|latency``; docs/latency.md)."""
