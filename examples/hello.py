"""A first bundle: two endpoints, one of which fails on purpose.

    atrund exec examples/hello.py --runtime python --endpoint greet --args '{"name": "ada"}'
"""


def greet(args):
    name = args.get("name", "world")
    print(f"greeting {name}")  # bundle output goes to the runner's log, never into the result
    return {"greeting": f"hello, {name}!"}


def divide(args):
    """Fails when asked to divide by zero: the result record says why."""
    return {"quotient": args["a"] // args["b"]}
