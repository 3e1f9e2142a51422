"""First and second load of the embedded default model (issue floor: second load <= 5 s).

Each load runs in a fresh Python process with an empty cache folder, so the first load
dequantises the GGUF file and writes the safetensors cache and the second reads it.

    .venv/bin/python bench/load_time.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from _common import save

CODE = (
    "import time; t = time.perf_counter(); import acteng; m = acteng.load_model(); "
    "print(time.perf_counter() - t)"
)


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "ACTENG_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        times = []
        for label in ("first load (dequantise + write cache)", "second load (from cache)"):
            out = subprocess.run(
                [sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True
            )
            seconds = float(out.stdout.strip().splitlines()[-1])
            times.append(seconds)
            print(f"{label:<40} {seconds:6.2f} s (including import acteng + torch)")
    path = save("load_time", {"first_s": round(times[0], 2), "second_s": round(times[1], 2)})
    print(f"floor: second load <= 5 s; written to {path}")


if __name__ == "__main__":
    main()
