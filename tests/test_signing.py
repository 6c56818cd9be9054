"""Signed shared-dir files: the key, the signature format, and SharedStore refusing forgeries before parsing."""

from __future__ import annotations

import json
import os
import stat

import pytest

from node.schemas import RoundState
from node.signing import (BAD_SIGNATURE, UNSIGNED, KeyProblem, SignatureError, Signer, create_key_file,
                          read_key_file, resolve_key)
from node.storage import SharedStore

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def _state(round_=3) -> RoundState:
    return RoundState(experiment="e", round=round_, stage=0, started_at=1.0, updated_at=1.0, finished=False,
                      max_rounds=10)


def test_a_signed_file_is_plain_json_with_the_hmac_as_its_last_key():
    body = json.dumps({"a": 1, "b": [1, 2]}, separators=(",", ":")).encode()
    signed = Signer(KEY).sign(body, "rollouts/round_1/stage_0/w.json")
    obj = json.loads(signed)
    assert list(obj) == ["a", "b", "hmac"] and len(obj["hmac"]) == 64
    assert Signer(KEY).verify(signed, "rollouts/round_1/stage_0/w.json") == body


@pytest.mark.parametrize("tamper", [
    lambda d, ctx: (d.replace(b'"a":1', b'"a":2'), ctx),            # content changed
    lambda d, ctx: (d, "rollouts/round_2/stage_0/w.json"),          # moved to another round
    lambda d, ctx: (d[:-10] + b"0" * 8 + d[-2:], ctx),             # signature changed
])
def test_any_change_of_content_path_or_signature_is_a_bad_signature(tamper):
    ctx = "rollouts/round_1/stage_0/w.json"
    data, where = tamper(Signer(KEY).sign(b'{"a":1}', ctx), ctx)
    with pytest.raises(SignatureError) as err:
        Signer(KEY).verify(data, where)
    assert err.value.reason == BAD_SIGNATURE


def test_another_key_and_unsigned_files_are_refused_unless_unsigned_is_allowed():
    signed = Signer(OTHER).sign(b'{"a":1}', "x.json")
    with pytest.raises(SignatureError, match=BAD_SIGNATURE):
        Signer(KEY).verify(signed, "x.json")
    with pytest.raises(SignatureError, match=UNSIGNED):
        Signer(KEY).verify(b'{"a":1}', "x.json")
    assert Signer(KEY, required=False).verify(b'{"a":1}', "x.json") == b'{"a":1}'
    with pytest.raises(SignatureError, match=BAD_SIGNATURE):  # not required, but a wrong one is still wrong
        Signer(KEY, required=False).verify(signed, "x.json")
    assert Signer(None).verify(signed, "x.json") == b'{"a":1}'  # no key: stripped, not checked


def test_key_file_is_created_once_0600_and_shared_by_concurrent_creators(tmp_path):
    path = tmp_path / "run" / "swarm.key"
    first = create_key_file(path)
    assert create_key_file(path) == first  # the second creator reads the first one's key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_key_file(path) == first and len(first) == 32
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_resolve_key_order_and_clear_errors(tmp_path):
    key_file = tmp_path / "k"
    key_file.write_text(OTHER.hex())
    key_file.chmod(0o600)
    run = tmp_path / "run"
    assert resolve_key(key_file=key_file, runtime_dir=run, environ={"SWARM_KEY": KEY.hex()}, create=True)[0] == OTHER
    assert resolve_key(key_file=None, runtime_dir=run, environ={"SWARM_KEY": KEY.hex()}, create=True)[0] == KEY
    assert resolve_key(key_file=None, runtime_dir=run, environ={}, create=False) == (None, "")
    created, source = resolve_key(key_file=None, runtime_dir=run, environ={}, create=True)
    assert "new" in source and resolve_key(key_file=None, runtime_dir=run, environ={}, create=False)[0] == created
    with pytest.raises(KeyProblem, match="not a hex key"):
        resolve_key(key_file=None, runtime_dir=run, environ={"SWARM_KEY": "zz"}, create=True)
    with pytest.raises(KeyProblem, match="too short"):
        resolve_key(key_file=None, runtime_dir=run, environ={"SWARM_KEY": "abcd"}, create=True)
    key_file.chmod(0o644)
    with pytest.raises(KeyProblem, match="chmod 600"):
        read_key_file(key_file)


def test_store_signs_what_it_writes_and_refuses_forgeries_before_parsing(tmp_path):
    ours = SharedStore(tmp_path / "exp", signer=Signer(KEY), lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool")
    path = ours.layout.state_file()
    ours.write_json_atomic(path, _state().to_json())
    assert ours.read_as(path, RoundState.from_json) == _state()
    assert json.loads(path.read_bytes())["hmac"]

    outsider = SharedStore(tmp_path / "exp", signer=Signer(OTHER), lock_dir=tmp_path / "l2", spool_dir=tmp_path / "s2")
    outsider.write_json_atomic(path, _state(9).to_json())           # well-formed, wrong key
    assert ours.read_as(path, RoundState.from_json) is None
    path.write_bytes(json.dumps(_state(9).to_json()).encode())      # well-formed, unsigned
    assert ours.read_as(path, RoundState.from_json) is None
    path.write_bytes(b'{"deep":' * 100_000)                          # unsigned junk: never parsed
    assert ours.read_json(path) is None
    assert ours.rejected == {BAD_SIGNATURE: 1, UNSIGNED: 2}


def test_store_signs_each_jsonl_line_and_drops_forged_lines(tmp_path):
    store = SharedStore(tmp_path / "exp", signer=Signer(KEY), lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool")
    path = store.layout.metrics_file("worker_1")
    store.append_jsonl(path, {"node_id": "worker_1", "round": 0})
    with open(path, "ab") as f:
        f.write(b'{"node_id":"worker_1","round":1}\n')                  # forged: unsigned
        f.write(Signer(KEY).sign(b'{"node_id":"worker_1","round":2}', "logs/worker_2/metrics.jsonl") + b"\n")
    store.append_jsonl(path, {"node_id": "worker_1", "round": 3})
    rows, bad = store.read_jsonl(path)
    assert [r["round"] for r in rows] == [0, 3] and bad == 2
    assert all("hmac" not in r for r in rows)


def test_an_archived_copy_still_verifies_and_a_copy_elsewhere_does_not(tmp_path):
    """Retention copies files byte for byte to ``archives/<name>/<kind>/round_R``: the same path relative to the
    archive root, so the copy verifies; the same bytes under another round do not."""
    store = SharedStore(tmp_path / "shared" / "experiments" / "e", signer=Signer(KEY), lock_dir=tmp_path / "locks",
                        spool_dir=tmp_path / "spool")
    src = store.layout.rollout_file(1, 0, "w")
    store.write_json_atomic(src, {"peer_id": "w", "round": 1})
    archived = store.layout.archive_dir("rollouts", 1) / "stage_0" / "w.json"
    moved = store.layout.rollout_file(2, 0, "w")
    for dst in (archived, moved):
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    assert store.read_json(archived) == {"peer_id": "w", "round": 1}
    assert store.read_json(moved) is None and store.rejected == {BAD_SIGNATURE: 1}
