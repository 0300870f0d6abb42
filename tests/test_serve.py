"""The policy server (ZeroMQ, real sockets on loopback): the protocol, parity with in-process inference, bad
messages answered with errors while the server keeps serving, an unreachable server and an observation-spec
mismatch as clear errors, `serve` + `deploy policy=remote` through the CLI with graceful SIGTERM on both sides.
Behaviour only: no assertion depends on how fast this machine is."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq
from test_deploy import tiny_checkpoint

from shortcut_policy import cli
from shortcut_policy.deploy.loop import make_policy_fn
from shortcut_policy.deploy.robot import ObservationError
from shortcut_policy.deploy.server import (
    PROTOCOL,
    PolicyServer,
    ProtocolError,
    RemotePolicy,
    RemotePolicyError,
    ServerUnreachable,
    decode_message,
    encode_message,
)
from shortcut_policy.policy import load_policy


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(ckpt):
    """A PolicyServer on a free loopback port, serving in a thread until the module's tests are done."""
    srv = PolicyServer(load_policy(ckpt), port=0, max_message_bytes=64 * 1024, name=str(ckpt)).bind()
    stop = threading.Event()
    result = {}
    t = threading.Thread(target=lambda: result.update(srv.serve(stop=stop, poll_ms=20)), daemon=True)
    t.start()
    yield srv
    stop.set()
    t.join(10)
    assert result["stopped_by"] == "stop"


def obs_window(t=1.0, value=200.0):
    return {"obs": np.full((2, 20), value, np.float32), "timestamp": np.array([t - 0.1, t])}


def test_messages_round_trip_and_malformed_ones_are_named():
    frames = encode_message({"type": "infer", "id": 3}, {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    head, arrays = decode_message([bytes(f) for f in frames])
    assert head["type"] == "infer" and head["id"] == 3
    np.testing.assert_array_equal(arrays["a"], np.arange(6).reshape(2, 3))
    with pytest.raises(ProtocolError, match="header is not JSON"):
        decode_message([b"\xff{"])
    with pytest.raises(ProtocolError, match="lists 1 array.*carries 0"):
        decode_message([frames[0]])
    with pytest.raises(ProtocolError, match="array 'a': 8 bytes for shape \\[2, 3\\] float32"):
        decode_message([frames[0], b"12345678"])
    bad = json.dumps({"type": "x", "arrays": [{"key": "a", "dtype": "object", "shape": [1]}]}).encode()
    with pytest.raises(ProtocolError, match="dtype 'object' not accepted"):
        decode_message([bad, b"1"])
    with pytest.raises(ProtocolError, match="exceeds the server's max_message_bytes=100"):
        decode_message([b"{}", b"x" * 200], max_bytes=100)


def test_remote_inference_matches_in_process_inference(server, ckpt):
    with RemotePolicy(server.address, timeout_s=30, connect_timeout_s=30) as client:
        spec = client.hello()
        assert spec["protocol"] == PROTOCOL and spec["obs_shapes"] == {"obs": [20]} and spec["n_obs_steps"] == 2
        assert spec["n_action_steps"] == 8 and spec["action_dim"] == 2
        obs = obs_window()
        got = client.infer(obs)
        assert got.shape == (8, 2) and got.dtype == np.float32
        assert client.ping() > 0
    # a fresh server and a fresh in-process policy with the same noise seed give the same chunk
    local = make_policy_fn(load_policy(ckpt), 1, seed=0)
    srv2 = PolicyServer(load_policy(ckpt), port=0, seed=0).bind()
    stop = threading.Event()
    t = threading.Thread(target=srv2.serve, kwargs={"stop": stop, "poll_ms": 20}, daemon=True)
    t.start()
    try:
        with RemotePolicy(srv2.address, timeout_s=30) as c2:
            c2.hello()
            np.testing.assert_allclose(c2.infer(obs_window()), local({"obs": obs_window()["obs"]}), rtol=1e-6)
    finally:
        stop.set()
        t.join(10)


def test_bad_requests_get_errors_and_the_server_keeps_serving(server):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{server.address}")

    def ask(frames):
        s.send_multipart(frames)
        assert s.poll(30_000), "no reply"
        return decode_message(s.recv_multipart())[0]

    try:
        assert "header is not JSON" in ask([b"not json"])["error"]
        assert "unknown message type 'fly'" in ask(encode_message({"type": "fly", "id": 1}))["error"]
        big = encode_message({"type": "infer", "id": 2}, {"obs": np.zeros((2, 20_000), np.float32)})
        assert "exceeds the server's max_message_bytes=65536" in ask(big)["error"]
        wrong = {"obs": np.zeros((2, 19), np.float32), "timestamp": np.zeros(2)}
        r = ask(encode_message({"type": "infer", "id": 3}, wrong))
        assert r["id"] == 3 and "observation 'obs' has shape (2, 19)" in r["error"]
        r = ask(encode_message({"type": "infer", "id": 4}, {"obs": np.zeros((2, 20), np.float32)}))
        assert "'timestamp' missing" in r["error"]
        nan = obs_window()
        nan["obs"][0, 0] = np.nan
        assert "contains NaN" in ask(encode_message({"type": "infer", "id": 5}, nan))["error"]
        r = ask(encode_message({"type": "infer", "id": 6, "steps": 3}, obs_window()))
        assert "steps" in r["error"]
        ok = ask(encode_message({"type": "infer", "id": 7}, obs_window()))
        assert ok["type"] == "actions" and ok["id"] == 7 and abs(ok["t_obs"] - 1.0) < 1e-12
        assert server.stats["errors"] >= 7 and server.last_error
    finally:
        s.close()
        ctx.term()
    with RemotePolicy(server.address, timeout_s=30) as client:  # and a well-behaved client is still served
        client.hello()
        with pytest.raises(RemotePolicyError, match="observation 'obs' has shape"):
            client.infer({"obs": np.zeros((2, 5), np.float32), "timestamp": np.zeros(2)})
        assert client.infer(obs_window()).shape == (8, 2)


def test_unreachable_server_and_spec_mismatch_are_clear_errors(server, tmp_path):
    with zmq.Context() as ctx:  # a port with nothing listening
        probe = ctx.socket(zmq.ROUTER)
        port = probe.bind_to_random_port("tcp://127.0.0.1")
        probe.close(linger=0)
    client = RemotePolicy(f"127.0.0.1:{port}", connect_timeout_s=0.5)
    t = time.perf_counter()
    with pytest.raises(ServerUnreachable, match=f"no policy server answered at tcp://127.0.0.1:{port} within 0.5 s"):
        client.hello()
    assert time.perf_counter() - t < 10
    client.close()
    with pytest.raises(ServerUnreachable, match="shortcut-policy serve"):
        cli.run_verb(
            "deploy",
            [
                "policy=remote",
                f"policy.address=127.0.0.1:{port}",
                "policy.connect_timeout_s=0.5",
                f"run_dir={tmp_path / 'unreachable'}",
            ],
        )
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        cli.run_verb("deploy", ["policy=remote", "policy.address=nohost", f"run_dir={tmp_path / 'bad'}"])
    # the checkpoint sees keypoints (20), the robot gives the 5-d state
    with pytest.raises(ObservationError, match=r"observation 'obs': policy server .* expects per-step shape \(20,\)"):
        cli.run_verb(
            "deploy",
            [
                "policy=remote",
                f"policy.address={server.address}",
                "robot.obs_type=state",
                "status=false",
                f"run_dir={tmp_path / 'mismatch'}",
            ],
        )


def _start(args, env):
    return subprocess.Popen(
        [sys.executable, "-m", "shortcut_policy.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(proc, pattern, timeout=120):
    """Read proc's stderr lines until one matches ``pattern``; returns the match."""
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r}; stderr so far: {''.join(seen)[-2000:]}")


def test_serve_and_remote_deploy_through_the_cli_with_sigterm_on_both_sides(ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    srv = _start(["serve", f"checkpoint={ckpt}", "port=0", f"run_dir={tmp_path / 'serve'}"], env)
    try:
        port = int(_wait_for(srv, r"on tcp://127\.0\.0\.1:(\d+)").group(1))
        res = cli.run_verb(
            "deploy",
            [
                "policy=remote",
                f"policy.address=127.0.0.1:{port}",
                "policy.timeout_s=30",
                "robot=sim_pusht",
                "hz=20",
                "n_steps=30",
                "mode=async",
                "status=false",
                "warmup=2",
                f"run_dir={tmp_path / 'deploy'}",
            ],
        )
        assert res["policy"] == "remote" and res["cycles"] + res["skipped_ticks"] == 30 and res["chunks"] >= 1
        assert res["objective"] and res["checkpoint"] == str(ckpt)
        assert res["round_trip_p50_ms"] >= res["server_inference_p50_ms"] > 0

        # Ctrl-C / SIGTERM on the robot side: the loop stops, the robot is closed, RESULT is printed
        dep = _start(
            [
                "deploy",
                "policy=remote",
                f"policy.address=127.0.0.1:{port}",
                "policy.timeout_s=30",
                "hz=10",
                "n_steps=100000",
                "mode=async",
                "status=false",
                f"run_dir={tmp_path / 'deploy2'}",
            ],
            env,
        )
        try:
            _wait_for(dep, r"warm-up: ")
            time.sleep(1.0)
            dep.send_signal(signal.SIGTERM)
            out, err = dep.communicate(timeout=120)
        finally:
            dep.kill()
        assert dep.returncode == 0, err[-2000:]
        result = json.loads(out.strip().splitlines()[-1].removeprefix("RESULT "))
        assert result["stopped_by"] == "interrupt" and result["cycles"] < 100000

        # SIGTERM on the server side: it stops serving, closes its socket and prints its RESULT
        srv.send_signal(signal.SIGTERM)
        out, err = srv.communicate(timeout=60)
        assert srv.returncode == 0, err[-2000:]
        sres = json.loads(out.strip().splitlines()[-1].removeprefix("RESULT "))
        assert sres["stopped_by"] == "interrupt" and sres["infer"] >= 2 and sres["errors"] == 0
    finally:
        srv.kill()
