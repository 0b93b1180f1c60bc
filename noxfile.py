"""Every workflow of the repository: ``nox -l`` lists them.

Each session gets its own virtual environment and installs what it needs from the
packages' own metadata, so an undeclared dependency fails. Three things are shared between
the environments, each made once and reused by every session (and by later nox runs):

- torch and its dependencies, installed once into ``.nox/_shared/`` from the pin in
  ``.ci/constraints.txt`` and put on each session's path by a ``.pth`` file (torch is about
  1 GB installed; every session would otherwise install its own copy);
- the wheel of each package, built once per state of its sources into ``.nox/_wheels/``
  (attention-core's also covers ``csrc/``), so its C++ extension compiles once;
- Triton (another 1 GB) only in the ``slow`` session, where the Triton kernels run under
  its interpreter.
"""

from __future__ import annotations

import hashlib
import os
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
SHARED = ROOT / ".nox" / "_shared"
WHEELS = ROOT / ".nox" / "_wheels"
TORCH = "torch==2.13.0"
CORE = "packages/attention-core"
PACKAGES = {
    "attention-core": "attention_core",
    "recurrent-transformer": "recurrent_transformer",
    "block-recurrent-transformer": "block_recurrent_transformer",
    "feedback-transformer": "feedback_transformer",
}
MODELS = [name for name in PACKAGES if name != "attention-core"]
SOURCE_DIRS = [str(ROOT / "packages" / name / "src") for name in PACKAGES]
# parts of a package directory that are not in its wheel (or are build output)
NOT_SOURCES = {"tests", "build", "dist", "__pycache__", ".pytest_cache"}


def install(session: nox.Session, *args: str) -> None:
    """pip install with the repository's constraints (tool versions and the torch pin)."""
    session.install(*CONSTRAINTS, *args)


def install_torch(session: nox.Session) -> None:
    """Make the pinned torch importable in the session from the one copy in ``.nox/_shared``.

    pip sees the shared copy as installed, so installing a package that needs torch neither
    resolves nor copies torch again; everything else still goes into the session's own
    environment.
    """
    where = session.run(
        "python", "-c",
        "import sys, sysconfig; print(sys.implementation.cache_tag, sysconfig.get_path('purelib'))",
        silent=True,
    )  # fmt: skip
    tag, purelib = where.split()
    target = SHARED / f"torch-{tag}"
    if not (target / ".complete").is_file():
        shutil.rmtree(target, ignore_errors=True)
        session.run_install(
            "python", "-m", "pip", "install", "--quiet", *CONSTRAINTS, "--target", str(target),
            TORCH,
        )  # fmt: skip
        if (target / "torch").is_dir():  # not with nox --no-install, which skips installs
            (target / ".complete").touch()
    (Path(purelib) / "_shared_torch.pth").write_text(f"{target}\n")


def sources_digest(package: str) -> str:
    """A hash of everything that goes into a package's wheel (for attention-core, with csrc/)."""
    roots = [ROOT / "packages" / package] + ([ROOT / "csrc"] if package == "attention-core" else [])
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if path.is_dir() or NOT_SOURCES.intersection(relative.parts):
                continue
            if path.suffix in {".so", ".pyc", ".pyd"}:
                continue
            digest.update(f"{root.name}/{relative.as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def wheel(session: nox.Session, package: str) -> str:
    """The path of the package's wheel, built once per state of its sources.

    Wheels live in ``.nox/_wheels/<package>-<hash>/``; a change to the sources gives a new
    hash and a new build, and the wheels of older states are removed.
    """
    out = WHEELS / f"{package}-{sources_digest(package)}"
    if not any(out.glob("*.whl")):
        for old in WHEELS.glob(f"{package}-*"):
            shutil.rmtree(old, ignore_errors=True)
        building = out.with_name(out.name + ".partial")
        shutil.rmtree(building, ignore_errors=True)
        session.run_install(
            "python", "-m", "pip", "wheel", "--quiet", "--no-deps", *CONSTRAINTS,
            "--wheel-dir", str(building), str(ROOT / "packages" / package),
        )  # fmt: skip
        if building.is_dir():  # not with nox --no-install, which also skips every install
            building.rename(out)
    found = sorted(out.glob("*.whl"))
    return str(found[0]) if found else str(out)


def install_packages(session: nox.Session, *packages: str) -> None:
    """Install the shared torch, then the wheels of ``packages``.

    A package may carry extras, as in ``"attention-core[test]"``.
    """
    install_torch(session)
    wheels = {}
    for package in packages:
        name, bracket, extras = package.partition("[")
        wheels[wheel(session, name)] = bracket + extras
    install(session, *(path + extras for path, extras in wheels.items()))
    # pip keeps an installed package of the same version: in a reused environment (nox -r)
    # the wheels of changed sources must replace the old ones explicitly
    if getattr(session.virtualenv, "_reused", False):
        session.install("--no-deps", "--force-reinstall", *wheels)


@nox.session
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """Run one package's tests (not those marked slow) with only its declared dependencies."""
    # a model package's tests see the core's runtime dependencies and the model package's
    # own [test] extra, nothing more
    core = [] if package == "attention-core" else ["attention-core"]
    install_packages(session, *core, f"{package}[test]")
    session.run("pytest", f"packages/{package}/tests", "-m", "not slow", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """Run the tests marked slow: soak runs, DDP/FSDP, the Triton kernels under its interpreter.

    ``TRITON_INTERPRET=1`` is set for the whole pytest process, so each Triton kernel test
    runs on CPU tensors and reports on its own (with a CUDA device, unset it to run the
    compiled kernels: ``TRITON_INTERPRET=0 nox -s slow``).
    """
    install_packages(session, "attention-core[test,triton]", *(f"{name}[test]" for name in MODELS))
    interpret = os.environ.get("TRITON_INTERPRET", "1")
    session.run(
        "pytest", *(f"packages/{name}/tests" for name in PACKAGES), "-m", "slow",
        *session.posargs, env={"TRITON_INTERPRET": interpret},
    )  # fmt: skip


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, and the import-linter layering contracts."""
    install(session, "ruff", "import-linter")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # the contracts are in pyproject.toml; import-linter reads the sources without importing
    # them, so the packages need not be installed (nor compiled)
    session.run("lint-imports", "--no-cache", env={"PYTHONPATH": os.pathsep.join(SOURCE_DIRS)})


@nox.session
def docs(session: nox.Session) -> None:
    """Build the site with mkdocs --strict (never imports the packages) and check its links."""
    install(session, "mkdocs-material", "mkdocstrings", "mkdocstrings-python", "black", "pytest")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(ROOT / "site"))
    session.run("pytest", "docs/tests", "-p", "no:cacheprovider")


DEMO_REQUIREMENTS = ("-r", "examples/requirements.txt")


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """Train a character-level language model for about two minutes, then stream a sample.

    ``nox -s demo -- --compare --minutes 1 --compare-out docs/benchmarks`` trains every
    family with the same budget and writes the table and plot that docs/demo.md shows.
    """
    install_packages(session, *PACKAGES)
    install(session, *DEMO_REQUIREMENTS)
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session(default=False)
def seeds(session: nox.Session) -> None:
    """Run the fast-transformers documentation examples end to end and time every attention."""
    install_packages(session, "attention-core")
    session.run("python", "-m", "attention_core.demo", *session.posargs)


@nox.session
def examples(session: nox.Session) -> None:
    """Smoke-test the demo and the examples/ scripts on tiny settings (every model family)."""
    install_packages(session, *PACKAGES)
    install(session, *DEMO_REQUIREMENTS, "pytest")
    session.run("pytest", "examples", *session.posargs)


@nox.session
def compat(session: nox.Session) -> None:
    """Check lockstep versions: every model package pins attention-core to its own version."""
    session.run("python", str(ROOT / ".ci" / "check_versions.py"), external=True)


# peers for nox -s bench; fast-transformers compiles C++ against the installed torch (about
# 10-13 minutes on two cores) and must not see nvcc on a machine without CUDA
PEERS_PURE = ["feedback-transformer-pytorch==0.0.11"]
PEER_FAST_TRANSFORMERS = "pytorch-fast-transformers==0.4.0"


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Time this project against the peer libraries; writes docs/benchmarks/*.md.

    ``nox -s bench -- --quick`` passes ``--quick`` to every script; ``nox -R -s bench``
    reuses the environment (and the compiled fast-transformers).
    """
    install_packages(session, *PACKAGES)
    install(session, "numpy", "matplotlib")
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
    install_packages(session, "attention-core", "recurrent-transformer")
    # transformers: the suite checks the Hugging Face BERT weight mapper against a real BertModel
    install(session, "pytest", "numpy", "setuptools", "transformers")
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


# test modules without "kernel" in their name whose calls reach the C++ kernels too: the
# step ops, the prepared ops' fast paths (held addresses), the step chains and the causal
# product's forms
ASAN_TOO = (
    "cache_attention", "causal_chunked", "causal_fused", "linear_step", "prepared_ops",
    "residual_step", "step_chain", "step_chain_cache", "step_chain_review",
)  # fmt: skip


@nox.session(default=False)
def asan(session: nox.Session) -> None:
    """Build the C++ kernels with AddressSanitizer and run their tests under it."""
    # the kernel tests include the property tests of test_attention_core_kernel_validation.py
    # (wrong shapes, dtypes, devices, views, out-of-range indices), whose subprocess inherits
    # LD_PRELOAD and so runs under AddressSanitizer too
    install_torch(session)
    install(session, "einops>=0.7", "pytest", "hypothesis")
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
        if "kernel" in path.name or path.stem.removeprefix("test_attention_core_") in ASAN_TOO
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
    install_torch(session)
    (built,) = out.glob("attention_core-*.whl")
    install(session, str(built))
    session.run(
        "python",
        "-c",
        "import attention_core._C as C; print('compiled extension OK:', C.__doc__)",
        external=False,
    )


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the packages' sources (settings in pyproject.toml), and the settings' test."""
    # mypy reads the sources through mypy_path: the packages' dependencies are enough, the
    # compiled extension is typed by its stub (_C.pyi)
    install_torch(session)
    install(session, "einops>=0.7", "mypy", "pytest")
    session.run("mypy", *session.posargs)
    session.run("pytest", f"{CORE}/tests/test_attention_core_typing.py", "-p", "no:cacheprovider")
