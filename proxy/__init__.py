"""memshadow: a transparent Memcached proxy that shadows sampled keys to Redis."""

__version__ = "0.1.0"
