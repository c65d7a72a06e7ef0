"""Sizes the streaming path works with."""

MAX_SHARD_BYTES = 512 << 20  # output shard size: a pending shard is held in memory until it is written
