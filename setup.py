"""Build hook for the flow meter's compiled packet path (flows/meter/_fast.pyx).

Everything else about the package lives in pyproject.toml. The extension is
optional: without Cython or without a C compiler the install still succeeds and
``flows.meter`` uses its pure-Python packet path (``GATEWATCH_METER=auto``).
"""

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # no Cython in this build environment: pure Python only
    ext_modules = []
else:
    ext_modules = cythonize(
        [
            Extension(
                "flows.meter._fast",
                ["flows/meter/_fast.pyx"],
                # No fused multiply-add: time stamps must round as Python's do.
                extra_compile_args=["-O2", "-ffp-contract=off"],
            )
        ],
        compiler_directives={"language_level": "3"},
        quiet=True,
    )
    for ext in ext_modules:
        ext.optional = True  # cythonize does not carry the flag over

setup(ext_modules=ext_modules)
