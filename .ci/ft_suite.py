"""Run fast-transformers' own test suite against attention-core and recurrent-transformer.

Usage: ``python .ci/ft_suite.py TESTS_DIR [pytest arguments]`` (``nox -s ft-suite`` calls it).
It copies ``TESTS_DIR`` (the ``tests/`` folder of fast-transformers, from its 0.4.0 sdist or
from its master branch) into a scratch folder, deletes the GPU test files, adds
``ft_suite_conftest.py`` as ``conftest.py`` (it maps every ``fast_transformers.X`` import to
this project's module) and runs pytest there with ``--continue-on-collection-errors``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPU_MARKERS = ("gpu", "cuda")


def is_gpu_file(path: Path) -> bool:
    """Test files that need CUDA: fast-transformers names them ``*_gpu.py``/``*_cuda.py``."""
    return any(marker in path.stem.lower() for marker in GPU_MARKERS)


def prepare(tests: Path, scratch: Path) -> Path:
    """Copy ``tests`` into ``scratch`` without the GPU files and add the conftest."""
    suite = scratch / "tests"
    shutil.copytree(tests, suite, ignore=shutil.ignore_patterns("__pycache__"))
    for path in sorted(suite.rglob("*.py")):
        if is_gpu_file(path):
            path.unlink()
    shutil.copyfile(HERE / "ft_suite_conftest.py", scratch / "conftest.py")
    return suite


def main(argv: list[str]) -> int:
    if not argv or not Path(argv[0]).is_dir():
        print(__doc__, file=sys.stderr)
        print(f"TESTS_DIR must be a folder; got {argv[:1]}", file=sys.stderr)
        return 2
    tests, extra = Path(argv[0]).resolve(), argv[1:]
    with tempfile.TemporaryDirectory(prefix="ft-suite-") as tmp:
        scratch = Path(tmp)
        suite = prepare(tests, scratch)
        command = [
            sys.executable, "-m", "pytest", str(suite),
            "--continue-on-collection-errors", "--import-mode=importlib",
            "-p", "no:cacheprovider", "--rootdir", str(scratch), "-ra", *extra,
        ]  # fmt: skip
        return subprocess.call(command, cwd=scratch)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
