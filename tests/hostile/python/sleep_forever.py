"""Sleep past the timeout, idle: nothing is burning CPU, yet it must still be killed on time."""
import time


def main(args):
    time.sleep(10**6)
