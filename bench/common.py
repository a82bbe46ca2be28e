"""Benchmark inputs: the shared SwissProt sample replicated into a larger flat file (accessions made unique so
nothing is dropped as a duplicate), and a description of the machine the figures come from."""
import gzip
import os
import platform
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "..", "shared", "data", "swissprot_sample.dat.gz")


def replicated_flatfile(out_dir: str, copies: int) -> str:
    path = os.path.join(out_dir, f"sprot_x{copies}.dat")
    if not os.path.exists(path):
        raw = gzip.open(SAMPLE).read()
        # Keep records only (the sample carries one non-record note, which Biopython's parser cannot skip).
        raw = re.sub(rb"(?ms)^//\n(?!ID   ).*?(?=^ID   )", b"//\n", raw)
        with open(path + ".tmp", "wb") as f:
            for k in range(copies):
                f.write(re.sub(rb"(?m)^AC   (\w+);", lambda m: b"AC   " + m.group(1) + b"X%d;" % k, raw))
        os.replace(path + ".tmp", path)
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"
