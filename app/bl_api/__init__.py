"""bl-api: the reference service opsbook deploys, migrates, clones and loads."""

import os

# The release version is stamped into the wheel by `invoke build --version V`;
# BL_API_VERSION overrides it only for tests that fake a broken release.
__version__ = "1.1.0"


def running_version() -> str:
    return os.environ.get("BL_API_VERSION_OVERRIDE") or __version__
