"""bl-api: the reference service opsbook deploys, migrates, clones and loads."""

import os

# The release version is stamped into the wheel by `invoke build --version V`, which also sets
# RELEASE_BUILD: a built release always reports the version it is (the contract gate trusts it).
# BL_API_VERSION_OVERRIDE is honoured only by a source checkout, for tests that fake old versions.
__version__ = "1.1.0"
RELEASE_BUILD = False


def running_version() -> str:
    if RELEASE_BUILD:
        return __version__
    return os.environ.get("BL_API_VERSION_OVERRIDE") or __version__
