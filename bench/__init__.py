"""bench: artifacts in, measurements out. Latency, throughput, paired speedup with a bootstrap
interval, efficiency (speedup / FLOPs reduction) and top-1 of the slim model against its base,
per backend, device, precision and batch size (see docs/bench.md)."""
