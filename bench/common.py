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


def unfused_core_attention(block) -> list:
    """megatron-core's local unfused DotProductAttention for each layer of an encoder's TransformerBlock (what the
    encoders ran before transformer/padded_attention.py): the baseline its SDPA attention is measured against."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    return [DotProductAttention(block.config, i + 1, AttnMaskType.padding, "self") for i in range(len(block.layers))]


def set_core_attention(block, modules) -> list:
    """Put `modules` in the layers' core-attention slots; returns the ones they held."""
    held = [layer.self_attention.core_attention for layer in block.layers]
    for layer, m in zip(block.layers, modules):
        layer.self_attention.core_attention = m
    return held


def world_of_one():
    """megatron-core's groups for one process (gloo, a free port), for the single-process model benches."""
    import socket

    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    return state.initialize(ParallelConfig())


def median_seconds(fn, steps: int) -> float:
    """The median wall time of `steps` calls of fn, after one unmeasured call."""
    import statistics
    import time
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
