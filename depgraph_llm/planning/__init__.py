"""Planning: scores + a parameter budget -> per-group keep sets (the replayable PrunePlan)."""
