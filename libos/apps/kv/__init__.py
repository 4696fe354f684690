"""A Redis-compatible key-value server's protocol engine (RESP2), sans-I/O.

``KvEngine`` holds the keyspace and runs commands; ``KvSession`` is one connection
(bytes in, bytes out); ``resp`` parses requests and encodes replies. The transport
that moves the bytes lives elsewhere.
"""

from libos.apps.kv.commands import ClientState, Executed, KvEngine, WriteHook
from libos.apps.kv.resp import ParserLimits, ProtocolError, RequestParser
from libos.apps.kv.session import KvSession
from libos.apps.kv.store import Keyspace

__all__ = ["ClientState", "Executed", "Keyspace", "KvEngine", "KvSession", "ParserLimits",
           "ProtocolError", "RequestParser", "WriteHook"]
