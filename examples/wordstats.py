"""Text statistics. The mean is a float, which AT Protocol records cannot hold, so the runner
stores this return value as a dev.atrun.defs#jsonValue (exact JSON text); `atrund result get`
and `invoke --wait` decode it back."""

import collections
import re


def stats(args):
    words = re.findall(r"[a-z']+", args.get("text", "").lower())
    common = collections.Counter(words).most_common(3)
    return {
        "words": len(words),
        "distinct": len(set(words)),
        "meanLength": round(sum(map(len, words)) / len(words), 2) if words else 0,
        "top": [w for w, _ in common],
    }
