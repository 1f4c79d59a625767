"""Builds the one compiled extension, pgformat._native (libs/pgformat/_native.c).

Everything else is declared in pyproject.toml. The extension is optional: a
machine without a C compiler or Python headers still installs, and
pgformat.native falls back to the pure-Python implementations (saying so once).
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """build_ext that replaces an extension file instead of overwriting it in place.

    An editable install copies the built module into libs/pgformat/; writing
    over the old file would change the code under every running process that
    has it mapped (they could crash). Unlinking first gives the new module a new
    inode, and running processes keep the old one.
    """

    def copy_file(self, infile, outfile, *args, **kwargs):  # type: ignore[no-untyped-def]
        target = os.path.join(outfile, os.path.basename(infile)) if os.path.isdir(outfile) else outfile
        if str(target).endswith((".so", ".pyd")) and os.path.exists(target) and not os.path.samefile(infile, target):
            os.unlink(target)
        return super().copy_file(infile, outfile, *args, **kwargs)


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "pgformat._native",
            sources=["libs/pgformat/_native.c"],
            extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter"],
            optional=True,
        ),
    ],
)
