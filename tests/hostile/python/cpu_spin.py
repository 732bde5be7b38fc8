"""CPU spin past the timeout: never yields, never returns. Contained when the deadline kills it."""


def main(args):
    while True:
        pass
