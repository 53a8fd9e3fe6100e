"""Run a command and print its peak resident memory in bytes (ru_maxrss of that child alone).

python benchmarks/peak_rss.py CMD ARG...    # the command's own output goes to stderr
"""

from __future__ import annotations

import resource
import subprocess
import sys

if __name__ == "__main__":
    result = subprocess.run(sys.argv[1:], stdout=sys.stderr)
    if result.returncode != 0:
        sys.exit(result.returncode)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
