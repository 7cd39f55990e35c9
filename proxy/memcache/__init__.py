"""Sans-IO Memcached text protocol: request and response framing."""
