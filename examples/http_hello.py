"""An HTTP bundle: the runner's gateway calls ``handleRequest`` with the request as an object.

    atrund bundle publish examples/http_hello.py --runtime python
    curl 'http://127.0.0.1:8080/alice.example.com/RKEY/hello?name=ada'
    curl -X POST --data 'some text' http://127.0.0.1:8080/alice.example.com/RKEY/count

Try it locally (the request object is exactly what the gateway sends):

    atrund exec examples/http_hello.py --runtime python --endpoint handleRequest \\
        --args '{"method": "GET", "path": "/hello", "query": {"name": "ada"}, "headers": {}, "body": ""}'
"""

import json


def handleRequest(req):
    path, query = req["path"], req["query"]
    if path == "/hello":
        name = query.get("name", "world")
        return {"status": 200, "headers": {"content-type": "application/json"}, "body": json.dumps({"greeting": f"hello, {name}!"})}
    if path == "/count" and req["method"] == "POST":
        if req.get("isBase64"):
            return {"status": 415, "headers": {"content-type": "text/plain"}, "body": "send text, not binary"}
        words = req["body"].split()
        return {"status": 200, "headers": {"content-type": "application/json"}, "body": json.dumps({"words": len(words)})}
    return {"status": 404, "headers": {"content-type": "text/plain"}, "body": f"nothing at {path}\n"}
