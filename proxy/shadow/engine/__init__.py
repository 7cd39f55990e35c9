"""The shadow's engine, the worker side: replay on Redis in Memcached's reply order and the
verdict on every answer. Fed by the proxy side (proxy/shadow/: sampling, hand-off) through
wire.py's messages, in a worker process of its own (worker.py) or on the proxy's loop."""
