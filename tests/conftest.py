import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helpers such as engine_worker
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages
