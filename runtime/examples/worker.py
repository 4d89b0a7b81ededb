#!/usr/bin/env python3
"""The example stack's worker: it needs the web server ready (nexus starts it only then)
and asks it for a page every two seconds, printing what it got."""

import os
import time
import urllib.request

URL = f"http://127.0.0.1:{os.environ.get('PORT', '8080')}/"
n = 0
while True:
    n += 1
    try:
        with urllib.request.urlopen(URL, timeout=2) as r:
            print(f"tick {n}: {r.read().decode().strip()}", flush=True)
    except OSError as e:
        print(f"tick {n}: web unreachable: {e}", flush=True)
    time.sleep(2)
