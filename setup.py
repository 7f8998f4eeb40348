"""Extension list and build options only; metadata lives in pyproject.toml.

TEOMQ_DEBUG=1 builds the core with assertions, bounds checks and -O0 -g.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("TEOMQ_DEBUG", "") not in ("", "0")

compile_args = ["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3"]
directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

MODULES = ["crc32c", "frame_codec", "ring_queue", "dispatch", "client_core", "command_parser", "routes", "teoproxy"]

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
    ext_modules=cythonize(extensions, compiler_directives=directives, gdb_debug=DEBUG),
)
