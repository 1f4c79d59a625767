"""Builds the one compiled extension, pgformat._native (libs/pgformat/_native.c).

Everything else is declared in pyproject.toml. The extension is optional: a
machine without a C compiler or Python headers still installs, and
pgformat.native falls back to the pure-Python implementations (saying so once).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pgformat._native",
            sources=["libs/pgformat/_native.c"],
            extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter"],
            optional=True,
        ),
    ],
)
