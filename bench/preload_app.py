"""A WSGI application that costs about 50 MB to load, as a Django or FastAPI app
does: a heap of Python objects built at import (strings, dicts, lists), which is
what a worker forked from a loaded template shares copy-on-write and a worker that
loads the application itself pays again. It answers its pid and the pid that
loaded it.
"""

import os

# About 50 MB of live objects: 135k small dicts, each with a string and a list.
TABLE = [{"id": i, "name": "row-%08d" % i, "tags": [i % 7, i % 11]} for i in range(135_000)]
LOADED_BY = os.getpid()


def app(environ, start_response):
    body = b'{"pid": %d, "loaded_by": %d}' % (os.getpid(), LOADED_BY)
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
