"""Removal: a plan -> physically smaller modules and a config that rebuilds them."""
