"""The optional C part of the package (everything else is in pyproject.toml).

``bioc_webstats.etl._scan`` is the per-line loop of the ETL in C, ``bioc_webstats.etl._legacy``
the per-row loop of the legacy import (SQLite's functions are handed over at run time, nothing
is linked), both built against the stable ABI (one wheel for every Python >= 3.11 of a
platform). ``BIOC_WEBSTATS_PURE=1`` builds a
pure-Python wheel instead (a target of another architecture than the build machine): the
ETL then runs its Python loop, with the same results, about twice as slow.
"""

import os

from setuptools import Extension, setup

PURE = os.environ.get("BIOC_WEBSTATS_PURE", "") not in ("", "0")
# The release build (roles/webstats_release/files/build_wheelhouse.py) names the platform it
# checked the extension against, e.g. manylinux2014_x86_64; a local build is linux_<arch>.
WHEEL = {"py_limited_api": "cp311"}
if os.environ.get("BIOC_WEBSTATS_PLAT_NAME"):
    WHEEL["plat_name"] = os.environ["BIOC_WEBSTATS_PLAT_NAME"]

setup(
    ext_modules=[]
    if PURE
    else [
        Extension(
            f"bioc_webstats.etl.{name}",
            [f"src/bioc_webstats/etl/{name}.c"],
            # the header both include: a change rebuilds both, and the sdist ships it (only so)
            depends=["src/bioc_webstats/etl/_common.h"],
            py_limited_api=True,
            extra_compile_args=["-O2", "-fno-strict-aliasing"],
        )
        for name in ("_scan", "_legacy")
    ],
    options={} if PURE else {"bdist_wheel": WHEEL},
)
