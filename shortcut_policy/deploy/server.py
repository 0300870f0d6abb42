"""A policy server and its client over ZeroMQ (pyzmq): the control loop runs on the robot's computer, the policy on
another machine (``shortcut-policy serve`` / ``deploy policy=remote``).

Transport: one ZeroMQ ROUTER socket on the server, a DEALER socket per client (TCP). ZeroMQ does the framing,
reconnection and queueing; both sides bound their queues (``SNDHWM`` / ``RCVHWM`` = ``queue_size`` messages) and
the server refuses frames above a hard size (``MAXMSGSIZE``, ZeroMQ drops such a peer).

Messages are multipart: frame 0 a JSON header ``{"type", "id", ..., "arrays": [{"key", "dtype", "shape"}]}``, then one
raw little-endian buffer per listed array (numeric dtypes only; nothing is unpickled). Requests and replies:

* ``hello`` -> ``spec``: the checkpoint's observation spec (``obs_shapes``, ``action_dim``, ``n_obs_steps``,
  ``n_action_steps``, ``horizon``, ``control_hz``, task and objective names, the server's default ``steps``);
* ``infer`` (arrays: each observation key (To, ...) and ``timestamp`` (To,), the frames' capture times on the
  *client's* clock; optional ``steps``) -> ``actions`` (arrays: ``actions`` (Ta, Da) float32 and ``timestamps``
  (Ta,) = t_obs + k / control_hz, t_obs the latest frame's time: action k is due then, as in the local loop);
* ``ping`` -> ``pong`` (round-trip measurement without inference);
* anything wrong (unparsable header, unknown type, a message over ``max_message_bytes``, a missing key, a wrong
  shape or dtype, non-finite values, invalid ``steps``, an inference error) -> ``error`` ``{"error": message naming
  the field}``; the server keeps serving.

The server handles one request at a time (inference is serial on one policy); per-request state is not kept, its
statistics are counters and a bounded window of latencies, so memory does not grow over a long run. Replies carry
the request ``id``; the client discards a reply whose id is not the one it waits for (a late answer to a request
that timed out). The client raises :class:`ServerUnreachable` when no server answers the ``hello`` in time,
``TimeoutError`` when a request is not answered in time, :class:`RemotePolicyError` for an ``error`` reply.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque

import numpy as np
import zmq

from .loop import make_policy_fn
from .robot import TIMESTAMP_KEY, ObservationError, validate_observation

__all__ = [
    "PROTOCOL",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ProtocolError",
    "RemotePolicyError",
    "ServerUnreachable",
    "encode_message",
    "decode_message",
    "PolicyServer",
    "RemotePolicy",
    "parse_address",
]

PROTOCOL = "shortcut-policy/1"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_DTYPES = {"float16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64", "uint16", "bool"}
_MAX_FRAMES = 64
_MAX_HEADER_BYTES = 64 * 1024


class ProtocolError(ValueError):
    """A message that does not follow the protocol (the message names the field)."""


class RemotePolicyError(RuntimeError):
    """The policy server answered a request with an error (its message names the field)."""

    user_error = True


class ServerUnreachable(ConnectionError):
    """No policy server answered at the address within the timeout."""

    user_error = True


def parse_address(address) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"tcp://HOST:PORT"`` -> (host, port). Raises ``ValueError`` naming the address."""
    a = str(address or "").strip()
    if a.startswith("tcp://"):
        a = a[len("tcp://") :]
    host, sep, port = a.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"policy.address={address!r}: expected HOST:PORT (e.g. 127.0.0.1:5555)")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------------------------------------------------
# messages
def encode_message(header: dict, arrays: dict | None = None) -> list:
    """Frames of one message: the JSON header (with the ``arrays`` descriptors) and one buffer per array."""
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    desc = []
    for k, a in arrays.items():
        if a.dtype.byteorder == ">":
            a = arrays[k] = a.astype(a.dtype.newbyteorder("<"))
        desc.append({"key": k, "dtype": a.dtype.name, "shape": list(a.shape)})
    head = json.dumps({**header, "arrays": desc}, allow_nan=False).encode()
    return [head] + [memoryview(a).cast("B") if a.size else b"" for a in arrays.values()]


def decode_message(frames, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[dict, dict]:
    """(header, {key: array}) of a message's frames. Raises :class:`ProtocolError` naming what is wrong: too large
    (over ``max_bytes`` in all), too many frames, a header that is not a JSON object, array descriptors that do not
    match the buffers (count, dtype, shape, size)."""
    sizes = [len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames]
    total = sum(sizes)
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the server's max_message_bytes={max_bytes}")
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > _MAX_FRAMES:
        raise ProtocolError(f"message has {len(frames)} frames; at most {_MAX_FRAMES}")
    if sizes[0] > _MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {sizes[0]} bytes; at most {_MAX_HEADER_BYTES}")
    raw = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"malformed message: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"malformed message: header is a JSON {type(header).__name__}, expected an object")
    desc = header.get("arrays", [])
    if not isinstance(desc, list):
        raise ProtocolError("header field 'arrays' must be a list of {key, dtype, shape}")
    if len(desc) != len(frames) - 1:
        raise ProtocolError(f"header lists {len(desc)} array(s) but the message carries {len(frames) - 1} buffer(s)")
    arrays = {}
    for d, f, size in zip(desc, frames[1:], sizes[1:]):
        if not isinstance(d, dict) or not isinstance(d.get("key"), str):
            raise ProtocolError(f"array descriptor {d!r}: expected {{key: str, dtype: str, shape: [int, ...]}}")
        key, dt, shape = d["key"], d.get("dtype"), d.get("shape")
        if dt not in _DTYPES:
            raise ProtocolError(f"array {key!r}: dtype {dt!r} not accepted (one of {sorted(_DTYPES)})")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape)
        ):
            raise ProtocolError(f"array {key!r}: shape {shape!r} is not a list of at most 8 non-negative ints")
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        if want != size:
            raise ProtocolError(f"array {key!r}: {size} bytes for shape {shape} {dt} (expected {want})")
        if key in arrays:
            raise ProtocolError(f"array {key!r} appears twice")
        buf = f.buffer if hasattr(f, "buffer") else f
        arrays[key] = np.frombuffer(buf, dtype=np.dtype(dt).newbyteorder("<"), count=-1 if want else 0).reshape(shape)
    return header, arrays


def _pct(x, q):
    """The q-th percentile of ``x`` as a float (NaN for an empty sequence)."""
    return float(np.percentile(np.asarray(x, dtype=np.float64), q)) if len(x) else float("nan")


# ---------------------------------------------------------------------------------------------------------
# server
class PolicyServer:
    """Serve ``policy`` (a loaded :class:`~shortcut_policy.policy.Policy`) on ``tcp://host:port`` (``port=0``: a free
    port, see ``self.port`` after :meth:`bind`). ``steps``: default sampling steps; ``queue_size``: the socket's send
    and receive high-water marks (messages); ``max_message_bytes``: larger requests are answered with an error
    (ZeroMQ drops a peer sending a frame over 4x that); ``seed``: the sampling noise seed."""

    def __init__(
        self,
        policy,
        host: str = "127.0.0.1",
        port: int = 5555,
        steps: int = 1,
        queue_size: int = 8,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        seed: int | None = 0,
        name: str | None = None,
        log=None,
    ):
        self.policy, self.host, self.port = policy, str(host), int(port)
        self.default_steps = policy.check_steps(int(steps))
        self.queue_size, self.max_message_bytes = int(queue_size), int(max_message_bytes)
        if self.queue_size < 1 or self.max_message_bytes < 1024:
            raise ValueError(f"queue_size={queue_size} (>= 1), max_message_bytes={max_message_bytes} (>= 1024)")
        self.seed, self.log = seed, log
        task = dict(getattr(policy, "task_cfg", None) or {})
        self.spec = {
            "protocol": PROTOCOL,
            "obs_shapes": {k: list(map(int, v)) for k, v in policy.obs_encoder.obs_shapes.items()},
            "action_dim": int(policy.action_dim),
            "n_obs_steps": int(policy.n_obs_steps),
            "n_action_steps": int(policy.n_action_steps),
            "horizon": int(policy.horizon),
            "control_hz": float(task.get("control_hz") or 10.0),
            "task": task.get("name"),
            "objective": type(policy.objective).__name__,
            "steps": self.default_steps,
            "checkpoint": name,
        }
        self._fns: dict[int, object] = {}
        self._ctx = self._sock = None
        self.stats = {"requests": 0, "errors": 0, "infer": 0, "hello": 0, "ping": 0, "dropped_replies": 0}
        self.inference_s: deque = deque(maxlen=10_000)
        self.last_error: str | None = None

    # ---------------------------------------------------------------- socket
    def bind(self) -> "PolicyServer":
        """Open and bind the ROUTER socket (bounded queues, no linger); sets ``self.port`` for ``port=0``."""
        self._ctx = zmq.Context()
        s = self._ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, self.queue_size)
        s.setsockopt(zmq.SNDHWM, self.queue_size)
        s.setsockopt(zmq.MAXMSGSIZE, 4 * self.max_message_bytes)
        host = "*" if self.host in ("0.0.0.0", "*") else self.host
        try:
            if self.port == 0:
                self.port = s.bind_to_random_port(f"tcp://{host}")
            else:
                s.bind(f"tcp://{host}:{self.port}")
        except zmq.ZMQError as e:
            s.close()
            self._ctx.term()
            raise OSError(f"cannot serve on tcp://{self.host}:{self.port}: {e}") from None
        self._sock = s
        return self

    def close(self) -> None:
        """Close the socket and its context (idempotent)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def serve(self, stop: threading.Event | None = None, max_requests: int | None = None, poll_ms: int = 100) -> dict:
        """Answer requests until ``stop`` is set, ``max_requests`` were answered, or KeyboardInterrupt (Ctrl-C;
        ``serve`` on the command line maps SIGTERM to it): then the socket is closed and the summary returned."""
        if self._sock is None:
            self.bind()
        sock = self._sock
        stopped_by = "stop"
        try:
            while not (stop is not None and stop.is_set()):
                if max_requests is not None and self.stats["requests"] >= max_requests:
                    stopped_by = "max_requests"
                    break
                if not sock.poll(poll_ms, zmq.POLLIN):
                    continue
                frames = sock.recv_multipart(copy=False)
                ident, body = frames[0], frames[1:]
                reply = self.handle(body)
                try:
                    sock.send_multipart([ident, *reply], flags=zmq.NOBLOCK)
                except zmq.Again:  # the client's queue is full or it is gone: drop the reply, never block
                    self.stats["dropped_replies"] += 1
        except KeyboardInterrupt:
            stopped_by = "interrupt"
        finally:
            self.close()
        return {**self.summary(), "stopped_by": stopped_by}

    def summary(self) -> dict:
        """Counters and inference latency percentiles (ms) over the last 10,000 inferences."""
        lat = list(self.inference_s)
        return {
            **self.stats,
            "inference_p50_ms": 1e3 * _pct(lat, 50),
            "inference_p99_ms": 1e3 * _pct(lat, 99),
            "last_error": self.last_error,
        }

    # ---------------------------------------------------------------- requests
    def handle(self, frames) -> list:
        """The reply frames for one request's frames; never raises (errors become ``error`` replies)."""
        self.stats["requests"] += 1
        rid = None
        try:
            header, arrays = decode_message(frames, self.max_message_bytes)
            rid = header.get("id")
            kind = header.get("type")
            if kind == "hello":
                self.stats["hello"] += 1
                return encode_message({"type": "spec", "id": rid, **self.spec})
            if kind == "ping":
                self.stats["ping"] += 1
                return encode_message({"type": "pong", "id": rid})
            if kind == "infer":
                return self._infer(rid, header, arrays)
            raise ProtocolError(f"unknown message type {kind!r} (expected hello, infer or ping)")
        except (ProtocolError, ObservationError, ValueError, TypeError, KeyError) as e:
            return self._error(rid, str(e) if not isinstance(e, KeyError) else str(e.args[0]))
        except Exception as e:  # noqa: BLE001 - an inference failure is answered, the server keeps serving
            return self._error(rid, f"{type(e).__name__}: {e}")

    def _error(self, rid, message: str) -> list:
        """An ``error`` reply (counted, logged)."""
        self.stats["errors"] += 1
        self.last_error = message
        if self.log is not None:
            self.log(f"request {rid}: error: {message}")
        rid = rid if isinstance(rid, (int, str)) or rid is None else None
        return encode_message({"type": "error", "id": rid, "error": message})

    def _fn(self, steps: int):
        """The batch-1 inference function for ``steps`` (validated; cached per step count)."""
        if steps not in self._fns:
            self._fns[steps] = make_policy_fn(self.policy, steps, seed=self.seed)
        return self._fns[steps]

    def _infer(self, rid, header: dict, arrays: dict) -> list:
        """Validate an ``infer`` request (keys, shapes, finite values, timestamps, steps) and run the policy."""
        steps = header.get("steps", self.default_steps)
        if not isinstance(steps, int) or isinstance(steps, bool):
            raise ProtocolError(f"field 'steps' must be an integer, got {steps!r}")
        steps = self.policy.check_steps(steps)
        To = self.spec["n_obs_steps"]
        try:
            validate_observation(arrays, self.spec["obs_shapes"], To)
        except ObservationError as e:
            raise ObservationError(f"infer: {e}") from None
        ts = np.asarray(arrays[TIMESTAMP_KEY], dtype=np.float64)
        if not np.all(np.isfinite(ts)):
            raise ProtocolError(f"infer: {TIMESTAMP_KEY!r} holds non-finite values")
        obs = {k: np.asarray(arrays[k][-To:], dtype=np.float32) for k in self.spec["obs_shapes"]}
        self.stats["infer"] += 1
        t = time.perf_counter()
        chunk = np.asarray(self._fn(steps)(obs), dtype=np.float32)
        lat = time.perf_counter() - t
        self.inference_s.append(lat)
        t_obs = float(ts[-1])
        dt = 1.0 / self.spec["control_hz"]
        times = t_obs + dt * np.arange(chunk.shape[0], dtype=np.float64)
        return encode_message(
            {"type": "actions", "id": rid, "t_obs": t_obs, "dt": dt, "steps": steps, "inference_s": lat},
            {"actions": chunk, "timestamps": times},
        )


# ---------------------------------------------------------------------------------------------------------
# client
class RemotePolicy:
    """A client of :class:`PolicyServer` at ``address`` (HOST:PORT). :meth:`hello` fetches the server's spec
    (raising :class:`ServerUnreachable` after ``connect_timeout_s``); :meth:`infer` sends one timestamped
    observation window and returns its action chunk ((Ta, Da) float32; ``TimeoutError`` after ``timeout_s``,
    :class:`RemotePolicyError` for an error reply). Thread-safe (one request at a time); :meth:`close` is
    idempotent."""

    def __init__(
        self,
        address: str,
        timeout_s: float = 2.0,
        connect_timeout_s: float = 10.0,
        queue_size: int = 4,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.host, self.port = parse_address(address)
        self.address = f"{self.host}:{self.port}"
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.max_message_bytes = int(max_message_bytes)
        self._ctx = zmq.Context()
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, int(queue_size))
        s.setsockopt(zmq.RCVHWM, int(queue_size))
        s.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer that is not connected
        host = f"[{self.host}]" if ":" in self.host else self.host
        s.connect(f"tcp://{host}:{self.port}")
        self._sock = s
        self._lock = threading.Lock()
        self._next_id = 0
        self.spec: dict | None = None
        self.round_trip_s: deque = deque(maxlen=10_000)
        self.server_inference_s: deque = deque(maxlen=10_000)

    def close(self) -> None:
        """Close the socket and context (idempotent)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
                self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, header: dict, arrays: dict | None = None, timeout_s: float | None = None) -> tuple[dict, dict]:
        """Send one request and wait for its reply (replies to earlier, timed-out requests are discarded)."""
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        with self._lock:
            if self._sock is None:
                raise RuntimeError(f"policy client for {self.address} is closed")
            self._next_id += 1
            rid = self._next_id
            frames = encode_message({**header, "id": rid}, arrays)
            deadline = time.perf_counter() + timeout
            while True:  # not connected yet (IMMEDIATE): the send waits for the connection, within the deadline
                try:
                    self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:
                    if time.perf_counter() >= deadline:
                        raise TimeoutError(self._timeout_msg(header, timeout, sent=False)) from None
                    time.sleep(0.005)
            while True:
                left = deadline - time.perf_counter()
                if left <= 0 or not self._sock.poll(max(1, int(math.ceil(1e3 * left))), zmq.POLLIN):
                    raise TimeoutError(self._timeout_msg(header, timeout, sent=True))
                reply = self._sock.recv_multipart(copy=False)
                try:
                    head, out = decode_message(reply, max(self.max_message_bytes, 1 << 20))
                except ProtocolError as e:
                    raise RemotePolicyError(f"policy server {self.address}: unreadable reply ({e})") from None
                if head.get("id") != rid:
                    continue  # a late reply to an earlier request
                if head.get("type") == "error":
                    raise RemotePolicyError(f"policy server {self.address}: {head.get('error')}")
                return head, out

    def _timeout_msg(self, header, timeout, sent: bool) -> str:
        """The message of a request timeout."""
        what = header.get("type", "request")
        why = "no connection could be made" if not sent else "no reply"
        return (
            f"policy server {self.address}: {why} to {what!r} within {timeout:g} s (is `shortcut-policy serve` "
            f"running there and reachable? raise policy.timeout_s for a slow policy)"
        )

    def hello(self) -> dict:
        """The server's spec (also kept as ``self.spec``). Raises :class:`ServerUnreachable` when no server answers
        within ``connect_timeout_s``, :class:`RemotePolicyError` for a server speaking another protocol."""
        try:
            head, _ = self.request({"type": "hello", "protocol": PROTOCOL}, timeout_s=self.connect_timeout_s)
        except TimeoutError:
            raise ServerUnreachable(
                f"no policy server answered at tcp://{self.address} within {self.connect_timeout_s:g} s: start one "
                f"there with `shortcut-policy serve checkpoint=PATH port={self.port} host=0.0.0.0` (host=0.0.0.0 to "
                "accept other machines), or fix policy.address"
            ) from None
        if head.get("protocol") != PROTOCOL:
            raise RemotePolicyError(
                f"policy server {self.address} speaks {head.get('protocol')!r}, this client {PROTOCOL!r}"
            )
        self.spec = {k: v for k, v in head.items() if k not in ("type", "id", "arrays")}
        return self.spec

    def ping(self) -> float:
        """Round-trip seconds of a ``ping`` (no inference)."""
        t = time.perf_counter()
        self.request({"type": "ping"})
        return time.perf_counter() - t

    def infer(self, obs: dict, steps: int | None = None) -> np.ndarray:
        """The action chunk (Ta, Da) for ``obs`` = {key: (To, ...), "timestamp": (To,)} (capture times on this
        machine's clock). Raises ``TimeoutError``, :class:`RemotePolicyError` (the server's message names the field),
        or ``RemotePolicyError`` for a reply whose chunk or timestamps do not match the spec."""
        header = {"type": "infer"}
        if steps is not None:
            header["steps"] = int(steps)
        arrays = {}
        for k, v in obs.items():
            a = np.asarray(v)
            arrays[k] = a.astype(np.float64 if k == TIMESTAMP_KEY else np.float32, copy=False)
        t = time.perf_counter()
        head, out = self.request(header, arrays)
        self.round_trip_s.append(time.perf_counter() - t)
        if "inference_s" in head:
            self.server_inference_s.append(float(head["inference_s"]))
        chunk, times = out.get("actions"), out.get("timestamps")
        spec = self.spec or {}
        want = (spec.get("n_action_steps"), spec.get("action_dim"))
        if chunk is None or chunk.ndim != 2 or (spec and tuple(chunk.shape) != want) or not np.all(np.isfinite(chunk)):
            raise RemotePolicyError(
                f"policy server {self.address}: reply chunk {None if chunk is None else chunk.shape} is not a finite "
                f"(n_action_steps, action_dim) = {want} array"
            )
        if TIMESTAMP_KEY in arrays and times is not None and len(times):
            if abs(float(times[0]) - float(arrays[TIMESTAMP_KEY][-1])) > 1e-6:
                raise RemotePolicyError(
                    f"policy server {self.address}: reply timestamps start at {float(times[0])}, the observation was "
                    f"taken at {float(arrays[TIMESTAMP_KEY][-1])}"
                )
        return np.array(chunk, dtype=np.float32)

    def policy_fn(self, steps: int | None = None):
        """A ``policy_fn(obs) -> (Ta, Da)`` for the control loop; it asks the loop for the frames' timestamps
        (``accepts_timestamps``) and sends them with the window."""

        def fn(obs):
            return self.infer(obs, steps=steps)

        fn.accepts_timestamps = True
        return fn
