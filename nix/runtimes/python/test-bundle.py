"""The Python runtime's self-test bundle: `atrund exec nix/runtimes/python/test-bundle.py --runtime python --endpoint test --args '{}'` prints OK."""


def test(args):
    return {"ok": True, "echo": args}
