"""Every workflow of the repository: ``nox -l`` lists them.

Each session gets its own virtual environment and installs what it needs from the
packages' own metadata, so an undeclared dependency fails. ``.ci/constraints.txt`` pins
``torch==2.13.0``, the CPU build that this machine's pip finds on disk.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import nox
from nox.command import CommandFailed

nox.needs_version = ">=2024.3.2"
nox.options.default_venv_backend = "virtualenv"
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / ".ci" / "constraints.txt"))
CORE = "packages/attention-core"
PACKAGES = {
    "attention-core": "attention_core",
    "recurrent-transformer": "recurrent_transformer",
    "block-recurrent-transformer": "block_recurrent_transformer",
    "feedback-transformer": "feedback_transformer",
}
MODEL_PACKAGES = [f"packages/{name}" for name in PACKAGES if name != "attention-core"]


def install(session: nox.Session, *args: str) -> None:
    """pip install with the repository's constraints (torch pinned to the local CPU build)."""
    session.install(*CONSTRAINTS, *args)


@nox.session
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """Run one package's tests in a fresh environment (all four by default)."""
    install(session, "torch==2.13.0")
    # attention-core's tests also run its Triton kernels, under the Triton interpreter on CPU
    targets = [f"{CORE}[triton]"] if package == "attention-core" else [CORE, f"packages/{package}"]
    install(session, *targets)
    install(session, "pytest>=7", "hypothesis>=6")
    session.run("pytest", f"packages/{package}/tests", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole repository."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the site with mkdocs --strict (never imports the packages) and check its links."""
    session.install(
        "mkdocs-material>=9.5", "mkdocstrings>=1", "mkdocstrings-python>=2", "black", "pytest>=7"
    )
    session.run("mkdocs", "build", "--strict", "--site-dir", str(ROOT / "site"))
    session.run("pytest", "docs/tests", "-p", "no:cacheprovider")


DEMO_REQUIREMENTS = ("-r", "examples/requirements.txt")


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """The main job: train a character-level LM for ~2 minutes, then stream a sample.

    ``nox -s demo -- --compare --minutes 1 --compare-out docs/benchmarks`` trains every
    family with the same budget and writes the table and plot that docs/demo.md shows.
    """
    install(session, "torch==2.13.0")
    install(session, CORE, *MODEL_PACKAGES, *DEMO_REQUIREMENTS)
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session(default=False)
def seeds(session: nox.Session) -> None:
    """Run the fast-transformers seed examples end to end and time every attention type."""
    install(session, "torch==2.13.0")
    install(session, CORE)
    session.run("python", "-m", "attention_core.demo", *session.posargs)


@nox.session
def examples(session: nox.Session) -> None:
    """Smoke-test the demo and the examples/ scripts on tiny settings (every model family)."""
    install(session, "torch==2.13.0")
    install(session, CORE, *MODEL_PACKAGES, *DEMO_REQUIREMENTS, "pytest>=7")
    session.run("pytest", "examples", *session.posargs)


@nox.session
def compat(session: nox.Session) -> None:
    """Check lockstep versions: every model package pins attention-core to its own version."""
    session.run("python", str(ROOT / ".ci" / "check_versions.py"), external=True)


# peers for nox -s bench; fast-transformers compiles C++ against the installed torch (about
# 10-13 minutes here) and must not see nvcc on a machine without CUDA
PEERS_PURE = ["feedback-transformer-pytorch==0.0.11"]
PEER_FAST_TRANSFORMERS = "pytorch-fast-transformers==0.4.0"


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Time this project against the peer libraries; writes docs/benchmarks/*.md.

    ``nox -s bench -- --quick`` passes ``--quick`` to every script; ``nox -R -s bench``
    reuses the environment (and the compiled fast-transformers).
    """
    install(session, "torch==2.13.0")
    install(session, CORE, *MODEL_PACKAGES, "numpy", "matplotlib")
    session.install(*CONSTRAINTS, *PEERS_PURE)
    try:
        session.run("python", "-c", "import fast_transformers.causal_product", silent=True)
    except CommandFailed:
        session.install("setuptools", "wheel", "pybind11")
        python = str(Path(session.bin) / "python")
        session.run(
            "env", "PATH=/usr/bin:/bin", python, "-m", "pip", "install", *CONSTRAINTS,
            "--no-build-isolation", PEER_FAST_TRANSFORMERS, external=True,
        )  # fmt: skip
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        session.run("python", str(script), *session.posargs)
    session.run("python", "benchmarks/plot_results.py")


@nox.session(name="ft-suite", default=False)
def ft_suite(session: nox.Session) -> None:
    """Run fast-transformers' own CPU test suite against attention-core + recurrent-transformer.

    ``nox -s ft-suite`` takes the suite from the 0.4.0 sdist on the package registry (network);
    ``nox -s ft-suite -- PATH/tests [pytest args]`` runs another copy of its ``tests/`` folder,
    e.g. master's. See docs/migrating.md.
    """
    install(session, "torch==2.13.0")
    # transformers: the suite checks the Hugging Face BERT weight mapper against a real BertModel
    install(
        session, CORE, "packages/recurrent-transformer", "pytest>=7", "numpy", "setuptools",
        "transformers",
    )  # fmt: skip
    args = list(session.posargs)
    if args and Path(args[0]).is_dir():
        tests = Path(args.pop(0)).resolve()
    else:
        out = Path(session.create_tmp()) / "ft-sdist"
        shutil.rmtree(out, ignore_errors=True)
        # the sdist's setup.py imports torch (so no build isolation) and must not see nvcc
        python = str(Path(session.bin) / "python")
        session.run(
            "env", "PATH=/usr/bin:/bin", python, "-m", "pip", "download", "--quiet",
            "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
            "-d", str(out), PEER_FAST_TRANSFORMERS, external=True,
        )  # fmt: skip
        (archive,) = out.glob("pytorch*fast*transformers-*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(out, filter="data")
        tests = out / archive.name.removesuffix(".tar.gz") / "tests"
    session.run("python", str(ROOT / ".ci" / "ft_suite.py"), str(tests), *args)


@nox.session(default=False)
def asan(session: nox.Session) -> None:
    """Build the C++ kernels with AddressSanitizer and run their tests under it."""
    # the kernel tests include the property tests of test_attention_core_kernel_validation.py
    # (wrong shapes, dtypes, devices, views, out-of-range indices), whose subprocess inherits
    # LD_PRELOAD and so runs under AddressSanitizer too
    install(session, "torch==2.13.0", "einops>=0.7", "pytest>=7", "hypothesis>=6")
    session.install("scikit-build-core>=0.10", "pybind11>=2.12")
    flags = "-fsanitize=address -fno-omit-frame-pointer -O1 -g"
    session.install(
        "--no-build-isolation", "--no-deps", "--force-reinstall",
        "-C", f"cmake.define.CMAKE_CXX_FLAGS={flags}",
        "-C", "cmake.define.CMAKE_MODULE_LINKER_FLAGS=-fsanitize=address",
        "-C", "build-dir=build/asan", CORE,
    )  # fmt: skip
    # libstdc++ must be loaded with libasan, or ASan cannot intercept C++ throws (torch and
    # pybind11 use exceptions) and aborts on the first one
    preload = " ".join(
        session.run("gcc", f"-print-file-name={lib}", silent=True, external=True).strip()
        for lib in ("libasan.so", "libstdc++.so")
    )
    kernel_tests = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / CORE / "tests").glob("test_attention_core_*.py")
        if "kernel" in path.name
    )
    session.run(
        "pytest", *kernel_tests, "-p", "no:cacheprovider", "-s", *session.posargs,
        env={"LD_PRELOAD": preload, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1"},
    )  # fmt: skip


@nox.session
def sdist(session: nox.Session) -> None:
    """Build attention-core's sdist, then a wheel from the unpacked sdist alone."""
    session.install("build>=1.0")
    out = Path(session.create_tmp()) / "sdist"
    shutil.rmtree(out, ignore_errors=True)
    session.run("python", "-m", "build", "--sdist", "--outdir", str(out), CORE)
    (archive,) = out.glob("attention_core-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    unpacked = archive.name.removesuffix(".tar.gz")
    if not (out / unpacked / "csrc" / "bindings.cpp").is_file():
        session.error(f"the sdist {archive.name} does not contain csrc/bindings.cpp")
    session.run("python", "-m", "build", "--wheel", "--outdir", str(out), str(out / unpacked))
    install(session, "torch==2.13.0")
    (wheel,) = out.glob("attention_core-*.whl")
    install(session, str(wheel))
    session.run(
        "python",
        "-c",
        "import attention_core._C as C; print('compiled extension OK:', C.__doc__)",
        external=False,
    )
