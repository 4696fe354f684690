"""Serving files to other applications: the user-level file server RPC (way 1).

``session`` is the sans-I/O server half of ``kernelctl.fileproto``; ``sources`` the files an
application can serve (generated on open, kept in memory, or read from a local file);
``server`` the thread that runs the sessions and publishes the names in kernelctl's tree.
"""

from libos.files.server import FileServer, ServerError
from libos.files.sources import BytesSource, LocalFile, MemoryFile, Source

__all__ = ["BytesSource", "FileServer", "LocalFile", "MemoryFile", "ServerError", "Source"]
