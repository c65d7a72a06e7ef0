"""The jobs: prune (in memory or streamed one layer at a time), replay a saved plan, recover by training."""
