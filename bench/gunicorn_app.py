"""The WSGI app gunicorn serves in the benchmark: it answers its worker's pid."""
import json
import os


def app(environ, start_response):
    body = json.dumps({"pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
