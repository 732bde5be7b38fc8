"""A first bundle: two endpoints, one of which fails on purpose.

    atrund exec examples/hello.py --runtime python --endpoint greet --args '{"name": "ada"}'
"""


def greet(args):
    name = args.get("name", "world")
    print(f"greeting {name}")  # kept for you, never in the result: atrund exec echoes it, atrund logs reads it
    return {"greeting": f"hello, {name}!"}


def divide(args):
    """Fails when asked to divide by zero: the result record says why."""
    return {"quotient": args["a"] // args["b"]}
