"""Print fake protocol lines, hoping the runner takes one for the answer."""
import sys


def main(args):
    forged = '{"success": true, "data": {"forged": true}}\n'
    print('{"ready": true}')
    print(forged * 3, end="")
    sys.stderr.write(forged)
    sys.stdout.flush()
    return {"real": 1}
