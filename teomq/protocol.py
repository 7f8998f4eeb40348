"""Wire constants of the teomq frame protocol (docs/protocol.md is the full spec).

Frame layout, all integers little-endian::

    offset size field
    0      2    magic      b"TQ"
    2      1    version    1
    3      1    type       FrameType
    4      2    flags      Flag bits, meaning per type
    6      2    reserved   0 on send; a receiver refuses anything else
    8      8    id         message id (SEND, REPLY), delivery id (DELIVER, ANSWER), 0 or related id (ERROR)
    16     4    length     payload bytes that follow the header
    20     4    crc        CRC32C (Castagnoli) of header bytes 0..19, then the payload
    24     len  payload

The same 24-byte header and payload are what a broker appends to its log.
"""

from __future__ import annotations

import enum

MAGIC = b"TQ"
VERSION = 1
HEADER_SIZE = 24
DEFAULT_MAX_PAYLOAD = 1 << 20
#: Highest payload limit a broker or client accepts as configuration.
MAX_PAYLOAD_LIMIT = (1 << 31) - 1


class FrameType(enum.IntEnum):
    HELLO = 1  # client -> broker, msgpack map, first frame of a connection
    WELCOME = 2  # broker -> client, msgpack map, answer to HELLO
    SEND = 3  # client -> broker, id = the client's message id, payload = message
    DELIVER = 4  # broker -> consumer, id = delivery id, payload = message
    ANSWER = 5  # consumer -> broker, id = delivery id, payload = answer
    REPLY = 6  # broker -> client, id = the client's message id, payload = answer
    ERROR = 7  # either way, id = the related id or 0, payload msgpack {code, reason}
    PING = 8  # either way, id echoed in PONG
    PONG = 9
    FLOW = 10  # broker -> client that announced the "flow" capability: flags HOLD (1) or 0 (go on)
    CONFIRM = 11  # broker -> client: id = its last SEND flagged CONFIRM now stored, payload u32 count
    TOUCH = 12  # consumer -> broker ("lease"): payload u64 delivery ids whose handlers still run
    CANCEL = 13  # ("cancel") client -> broker: id = its message id; broker -> consumer: id = delivery id


MAX_FRAME_TYPE = 13


class Flag(enum.IntFlag):
    NONE = 0
    NO_REPLY = 0x1  # SEND: fire and forget, the broker relays no answer
    NO_ANSWER = 0x2  # ANSWER: the consumer acknowledges without an answer
    REDELIVERED = 0x4  # DELIVER: an earlier delivery of this message was not answered
    API = 0x8  # SEND: payload is [u8 API command][data], answered by the broker itself
    CONFIRM = 0x10  # SEND: confirm it (a CONFIRM frame) once stored by the broker's fsync policy
    DEADLINE = 0x20  # SEND ("deadline"): payload begins with u32 ms the producer waits at most
    FAIL_FAST = 0x40  # SEND ("deadline"): refused NO_CONSUMER when nobody consumes its queue
    DELAY = 0x80  # SEND ("delay"): payload begins (after a deadline's u32) with u32 ms it waits before delivery
    PRIORITY = 0x0F00  # SEND ("priority"): bits 8-11 hold its priority + 1 (0: its command's default)
    RETRY = 0x20  # ANSWER ("lease"): nack, payload msgpack {"delay": s or nil, "error": text or nil}
    REJECT = 0x40  # ANSWER ("lease"): dead-letter it, payload msgpack {"reason": text}


#: FLOW flag: hold SENDs back until a FLOW without it comes (answers, pings keep flowing).
FLOW_HOLD = 0x1
#: Capabilities a client may announce in HELLO ("caps"); the broker names those it speaks in WELCOME.
CAPABILITIES = ("flow", "confirm", "lease", "deadline", "cancel", "priority", "delay")
#: Clients reconnect after a lost connection: the first try after about RECONNECT_DELAY seconds
#: (jittered: half to all of it), each next wait twice as long up to RECONNECT_MAX_DELAY.
RECONNECT_DELAY = 0.1
RECONNECT_MAX_DELAY = 2.0
#: Priority levels of a queue: 0 (the lowest, the default) to PRIORITY_MAX.
PRIORITY_MAX = 7
#: The longest delay a SEND flagged DELAY carries (u32 ms: about 49.7 days).
DELAY_MAX = 0xFFFFFFFF / 1000


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1  # bad magic, version or reserved field
    BAD_CHECKSUM = 2
    TOO_LARGE = 3  # payload length over the receiver's limit
    UNKNOWN_TYPE = 4
    HANDSHAKE = 5  # no HELLO, a bad HELLO or a second HELLO
    UNKNOWN_ID = 6  # ANSWER for a delivery this connection does not hold
    QUEUE_FULL = 7  # SEND refused: the broker's queue is at its bound (message not accepted)
    SHUTDOWN = 8  # the broker is stopping
    NOT_ALLOWED = 9  # frame type not valid in this direction or state, or a request the sender may not make
    UNKNOWN_COMMAND = 10  # SEND refused: not a command of the broker's schema (message not accepted)
    INTERNAL = 11  # the broker failed to handle a frame of this connection (a bug, logged there): closed
    STORAGE = 12  # SEND refused: the broker cannot store it now (disk full, write error); not accepted, retryable
    DEAD_LETTERED = 13  # the request went to the dead-letter queue (too many failures or crashes)
    REJECTED = 14  # a consumer rejected the request (Reject): it is in the dead-letter queue
    EXPIRED = 15  # the request's deadline passed before a consumer took it: removed, never delivered
    NO_CONSUMER = 16  # SEND flagged FAIL_FAST refused: nobody consumes its queue (not accepted)
    LEASE_EXPIRED = 17  # ANSWER refused: its lease ran out and the message went back (or to another consumer)


class ApiCommand(enum.IntEnum):
    """Commands the broker answers itself (SEND with Flag.API, or by name in command mode)."""

    HELLO = 129  # answers "Hello <data>"
    MSG = 130  # feeds <data> in as if it had been sent normally; answers "OK"
    DLQ = 131  # the dead-letter queue: <data> is msgpack {"op": list|show|replay|purge, ...} (docs/semantics.md)


#: Error codes after which the sender of the bad frame is disconnected.
FATAL_CODES = frozenset(
    {ErrorCode.BAD_FRAME, ErrorCode.BAD_CHECKSUM, ErrorCode.TOO_LARGE, ErrorCode.UNKNOWN_TYPE, ErrorCode.HANDSHAKE,
     ErrorCode.INTERNAL}
)
