"""Importance estimators, registered by name. Each scores every element of a parameter; groups sum them."""
from .base import ESTIMATORS, Estimator, get_estimator, register_estimator, score_groups
from . import activations, experts, fisher, magnitude, obs, random, taylor  # noqa: F401  (registration)

__all__ = ["ESTIMATORS", "Estimator", "get_estimator", "register_estimator", "score_groups"]
