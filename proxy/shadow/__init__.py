"""Shadow path: sampling, translation to Redis, dispatch and comparison."""
