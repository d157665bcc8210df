"""Errors that reach the user as one line (the CLI prints them without a traceback)."""


class EdgeExitError(Exception):
    """A problem with the user's input or environment, described in one line."""


class SpecError(EdgeExitError):
    """model.yaml is wrong: the message starts with the field path that is at fault."""


class BundleError(EdgeExitError):
    """A bundle is missing, malformed or fails its checksums."""
