"""Extension list and build options only; metadata lives in pyproject.toml.

TEOMQ_DEBUG=1 builds the core with assertions, bounds checks and -O0 -g.
TEOMQ_BUILD_JOBS=N compiles N modules at once (default: one per CPU).

The build says what it does on stderr, a line per module (``pip install -v .`` shows them;
plain ``pip install .`` hides a backend's output unless the build fails).
"""

import os
import sys
import threading
import time

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("TEOMQ_DEBUG", "") not in ("", "0")
JOBS = max(1, int(os.environ.get("TEOMQ_BUILD_JOBS", "0")) or os.cpu_count() or 1)

compile_args = ["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3"]
directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

MODULES = ["crc32c", "frame_codec", "writer", "msglog", "slots", "ring_queue", "store", "routes", "command_parser",
           "endpoint", "seglog", "scheduler", "dispatch", "connection", "inproc", "client_core", "teoproxy"]


def say(line: str) -> None:
    """One progress line on stderr, flushed (pip -v passes it through as it comes)."""
    print(f"teomq build: {line}", file=sys.stderr, flush=True)


class BuildExt(build_ext):
    """build_ext that compiles the modules in parallel (-j) and prints a line as each starts and ends."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = JOBS
        self._lock = threading.Lock()
        self._done = 0
        self._todo = 0

    def say(self, line: str) -> None:
        """A progress line, unless -q (``setup.py -q build_ext --inplace`` stays quiet)."""
        if self.verbose:
            say(line)

    def _stale(self, ext: Extension) -> bool:
        """Whether build_extension will compile ``ext`` (the same test distutils makes)."""
        target = self.get_ext_fullpath(ext.name)
        if self.force or not os.path.exists(target):
            return True
        built = os.path.getmtime(target)
        return any(not os.path.exists(s) or os.path.getmtime(s) > built for s in [*ext.sources, *ext.depends])

    def build_extensions(self) -> None:
        self._todo = sum(1 for ext in self.extensions if self._stale(ext))
        if not self._todo:
            super().build_extensions()
            return
        self.say(f"compiling {self._todo} C extension modules of the core, {self.parallel} at a time "
                 f"({'debug, -O0 -g' if DEBUG else '-O3'})")
        started = time.monotonic()
        super().build_extensions()
        self.say(f"compiled the C core in {time.monotonic() - started:.1f} s")

    def build_extension(self, ext: Extension) -> None:
        if not self._stale(ext):
            super().build_extension(ext)  # up to date: distutils skips it
            return
        started = time.monotonic()
        self.say(f"compiling {ext.name} ...")
        super().build_extension(ext)
        with self._lock:
            self._done += 1
            done = self._done
        self.say(f"[{done}/{self._todo}] {ext.name} done in {time.monotonic() - started:.1f} s")


extensions = [
    Extension(
        f"teomq._core.{name}",
        [f"teomq/_core/{name}.pyx"],
        include_dirs=["teomq/_core"],
        extra_compile_args=compile_args,
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives, gdb_debug=DEBUG, nthreads=JOBS),
    cmdclass={"build_ext": BuildExt},
)
