import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helpers such as engine_worker
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages

# One persistent XLA compilation cache for the suite and the subprocesses it starts (they inherit the
# environment): many tests compile the same tiny programs again (engine runs of one configuration under
# different fault or resume scenarios), and on 2 CPU cores compiling dominates their time. Set before
# jax is imported; an existing JAX_COMPILATION_CACHE_DIR is kept.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
