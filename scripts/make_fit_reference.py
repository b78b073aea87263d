"""Write ``tests/fit_reference/``: every case of ``tests/fit_cases.py`` fitted by this
checkout's steerlab, as ``<case>.safetensors`` (the state tensors) and ``cases.json`` (the
rest of each fit; see ``fit_cases.snapshot``). ``tests/test_fit_driver.py`` compares a fresh
fit of every case with these, bit for bit. Run with one thread, as the tests do:

    OMP_NUM_THREADS=1 python scripts/make_fit_reference.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fit_cases import CASES, snapshot  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fit_reference")
    parser.add_argument("cases", nargs="*", help="only these cases (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "cases.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["STEERLAB_CACHE"] = cache
        for name in args.cases or list(CASES):
            tensors, meta = snapshot(CASES[name]())
            if tensors:
                save_file(tensors, str(out / f"{name}.safetensors"))
            index[name] = json.loads(meta)
            print(f"{name:40s} {len(tensors):3d} tensors", flush=True)
    index_path.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(index)} cases to {out}")


if __name__ == "__main__":
    main()
