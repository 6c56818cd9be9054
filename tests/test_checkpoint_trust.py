"""node.checkpoint against a hostile shared directory, with real torch on the tiny model and a signing store:
a planted "newest" checkpoint, zip bombs, a load that fails half way, pruning next to planted files, an
experiment from before the index, a forged index."""

from __future__ import annotations

import hashlib
import io
import os
import random
import secrets
import struct
import time
import zipfile
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from node.checkpoint import (CheckpointEntry, CheckpointIndex, check_torch_zip, index_path, load_latest_checkpoint,
                             prune_checkpoints, read_index, save_checkpoint)
from node.layout import ExperimentLayout
from node.schemas import RoundState, SchemaError
from node.signing import Signer
from node.storage import SharedStore
from sapo.tiny_model import build_tiny_gpt2

NODE = "worker_1"
KEY = secrets.token_bytes(32)
MAX_BYTES = 64 << 20


@pytest.fixture
def layout(tmp_path) -> ExperimentLayout:
    return ExperimentLayout.for_experiment(tmp_path / "shared", "exp")


def make_store(layout, tmp_path, key=KEY, required=True) -> SharedStore:
    store = SharedStore(layout, node_id=NODE, lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                        sleep=lambda s: None, retry_attempts=2, signer=Signer(key, required=required))
    store.ensure_layout()
    return store


@pytest.fixture
def store(layout, tmp_path) -> SharedStore:
    return make_store(layout, tmp_path)


class Policy:
    """A tiny GPT-2 and its Adam optimizer, trained one step per call to :meth:`step` (new weights and moments)."""

    def __init__(self, seed: int = 1):
        self.model, _ = build_tiny_gpt2(seed=seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)

    def step(self) -> None:
        self.optimizer.zero_grad()
        sum((p.float() ** 2).mean() for p in self.model.parameters()).backward()
        self.optimizer.step()

    def weights(self) -> dict[str, bytes]:
        """Every tensor's exact bytes: equal means bit-identical."""
        return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in self.model.state_dict().items()}

    def save(self, store, layout, round_, keep_last=3) -> bool:
        return save_checkpoint(store, layout, NODE, round_, self.model, self.optimizer, keep_last=keep_last)

    def load(self, store, layout):
        return load_latest_checkpoint(store, layout, NODE, self.model, self.optimizer, max_bytes=MAX_BYTES)


def train_and_save(store, layout, rounds, keep_last=3) -> dict[int, dict[str, bytes]]:
    """One policy trained and saved at each of ``rounds``: the weights each checkpoint holds."""
    policy, saved = Policy(), {}
    for r in rounds:
        policy.step()
        assert policy.save(store, layout, r, keep_last=keep_last)
        saved[r] = policy.weights()
    return saved


def ckpt_rounds(layout) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (layout.root / "checkpoints").glob(f"round_*/{NODE}.pt"))


def torch_bytes(payload) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def payload_of(policy: Policy, round_: int) -> dict:
    return {"version": 1, "node_id": NODE, "round": round_, "model": dict(policy.model.state_dict()),
            "optimizer": policy.optimizer.state_dict(), "rng": {"torch": torch.get_rng_state(),
                                                                "python": random.getstate()}}


def list_in_index(store, layout, files: dict[int, bytes]) -> None:
    """Write ``files`` (round -> bytes) as our checkpoints and a validly signed index listing them all:
    what an attacker holding our key, or a bug of ours, would produce."""
    entries = []
    for r, data in sorted(files.items()):
        path = layout.checkpoint_file(r, NODE)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entries.append(CheckpointEntry(round=r, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                       written_at=time.time()))
    index = CheckpointIndex(node_id=NODE, checkpoints=tuple(entries))
    store.write_json_atomic(index_path(layout, NODE), index.to_json())


# -- the planted "newest" checkpoint ------------------------------------------------------------------------
@pytest.mark.parametrize("planted", ["empty", "real torch file"])
def test_planted_newest_checkpoint_is_never_counted_loaded_or_deleted(store, layout, planted):
    saved = train_and_save(store, layout, [0, 1, 2])
    evil = layout.checkpoint_file(999_999_999, NODE)
    evil.parent.mkdir(parents=True)
    attacker = Policy(seed=7)
    evil.write_bytes(b"" if planted == "empty" else torch_bytes(payload_of(attacker, 999_999_999)))
    saved.update(train_and_save(store, layout, [3, 4]))  # each save used to prune every real checkpoint
    assert ckpt_rounds(layout) == [2, 3, 4, 999_999_999]  # keep_last=3 of ours; the planted file untouched
    fresh = Policy(seed=5)
    with capture_logs() as logs:
        restored = fresh.load(store, layout)
    assert restored.round == 4 and fresh.weights() == saved[4]
    unlisted = [e for e in logs if e["event"] == "checkpoint_unlisted"]
    assert len(unlisted) == 1 and unlisted[0]["rounds"] == [999_999_999]
    assert not [e for e in logs if e["event"] == "checkpoint_unusable"]  # never even tried


def test_a_listed_checkpoint_replaced_by_a_peer_is_refused_and_the_previous_one_restored(store, layout):
    saved = train_and_save(store, layout, [0, 1])
    layout.checkpoint_file(1, NODE).write_bytes(torch_bytes(payload_of(Policy(seed=9), 1)))  # valid torch, not ours
    fresh = Policy(seed=5)
    with capture_logs() as logs:
        restored = fresh.load(store, layout)
    assert restored.round == 0 and fresh.weights() == saved[0]
    assert any(e["event"] == "checkpoint_unusable" and "sha256" in e["error"] for e in logs)


# -- zip bombs --------------------------------------------------------------------------------------------------
def deflate_bomb(data: bytes, pad_bytes: int) -> bytes:
    """A torch checkpoint re-zipped with DEFLATE, plus a member of ``pad_bytes`` zeros (a ~1000x bomb)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        with dst.open("archive/data/999", "w") as pad:
            chunk = bytes(1 << 20)
            for _ in range(pad_bytes >> 20):
                pad.write(chunk)
    return out.getvalue()


def test_deflate_bomb_listed_with_a_matching_sha_is_refused_before_inflating(store, layout, monkeypatch):
    policy = Policy()
    policy.step()
    good = torch_bytes(payload_of(policy, 1))
    bomb = deflate_bomb(torch_bytes(payload_of(Policy(seed=3), 2)), 128 << 20)
    inflated = sum(i.file_size for i in zipfile.ZipFile(io.BytesIO(bomb)).infolist())
    assert inflated > 100 * len(bomb) and inflated > MAX_BYTES  # a real bomb, over the cap once inflated
    list_in_index(store, layout, {1: good, 2: bomb})
    loaded = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, **kw: loaded.append(len(f.getbuffer())) or real_load(f, **kw))
    fresh = Policy(seed=5)
    with capture_logs() as logs:
        restored = fresh.load(store, layout)
    assert restored.round == 1 and fresh.weights() == policy.weights()
    assert loaded == [len(good)]  # the bomb never reached torch.load
    refused = [e for e in logs if e["event"] == "checkpoint_unusable"]
    assert len(refused) == 1 and refused[0]["round"] == 2 and "compressed" in refused[0]["error"]


def overlapping_members(data: bytes, copies: int) -> bytes:
    """``data`` (a zip) with its central directory repeated: every member stored once, listed ``copies`` times."""
    eocd = data.rindex(b"PK\x05\x06")
    entries, cd_size, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    cd = data[cd_offset:cd_offset + cd_size]
    end = bytearray(data[eocd:])
    struct.pack_into("<HHII", end, 8, entries * copies, entries * copies, cd_size * copies, cd_offset)
    return data[:cd_offset] + cd * copies + bytes(end)


def test_zip_inspection_refuses_overlaps_member_floods_and_non_zips():
    policy = Policy()
    data = torch_bytes(payload_of(policy, 1))
    check_torch_zip(data, max_total=len(data))  # what torch.save writes passes
    n = len(zipfile.ZipFile(io.BytesIO(data)).infolist())
    with pytest.raises(ValueError, match="more than"):
        check_torch_zip(overlapping_members(data, 50), max_total=1 << 40)  # stored, but read 50 times over
    with pytest.raises(ValueError, match="zip members"):
        check_torch_zip(data, max_total=len(data), max_members=n - 1)
    with pytest.raises(ValueError, match="not a valid zip"):
        check_torch_zip(b"\x80\x02}q\x00." + bytes(100), max_total=1 << 20)  # a legacy (non-zip) torch file
    with pytest.raises(ValueError, match="more than"):
        check_torch_zip(data, max_total=len(data) // 2)


# -- all or nothing ---------------------------------------------------------------------------------------------
def rng_now() -> tuple:
    return torch.get_rng_state().clone(), random.getstate()


def test_failing_load_leaves_model_optimizer_and_rng_bit_identical(store, layout):
    source = Policy()
    source.step()
    payload = payload_of(source, 1)
    last = list(payload["model"])[-1]
    payload["model"][last] = torch.zeros(*payload["model"][last].shape[:-1], 3)  # the last tensor's shape is wrong
    list_in_index(store, layout, {1: torch_bytes(payload)})
    victim = Policy(seed=5)
    victim.step()
    before, moments, rng = victim.weights(), victim.optimizer.state_dict()["state"][0]["exp_avg"].clone(), rng_now()
    assert victim.load(store, layout) is None
    assert victim.weights() == before
    assert torch.equal(victim.optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]


def test_a_load_failing_after_the_weights_rolls_them_back_then_takes_the_previous_checkpoint(store, layout):
    saved = train_and_save(store, layout, [0])
    source = Policy(seed=9)
    source.step()
    payload = payload_of(source, 1)  # weights load fine; the optimizer's param groups do not fit
    payload["optimizer"]["param_groups"][0]["params"] = payload["optimizer"]["param_groups"][0]["params"][:-1]
    old = {0: layout.checkpoint_file(0, NODE).read_bytes()}
    list_in_index(store, layout, {**old, 1: torch_bytes(payload)})
    fresh = Policy(seed=5)
    with capture_logs() as logs:
        restored = fresh.load(store, layout)
    assert restored.round == 0 and fresh.weights() == saved[0]
    assert any(e["event"] == "checkpoint_unusable" and e["round"] == 1 for e in logs)
    fresh2 = Policy(seed=5)
    before = fresh2.weights()
    list_in_index(store, layout, {1: torch_bytes(payload)})  # only the bad one: nothing loads, nothing changes
    assert fresh2.load(store, layout) is None and fresh2.weights() == before


# -- pruning ----------------------------------------------------------------------------------------------------
def test_prune_never_touches_planted_files_or_follows_a_swapped_round_dir(store, layout, tmp_path):
    train_and_save(store, layout, [0, 1])
    ckpts = layout.root / "checkpoints"
    (ckpts / "round_0" / "planted.txt").write_text("not ours")  # in a round dir we prune
    (ckpts / "round_5").mkdir()
    (ckpts / "round_5" / f"{NODE}.pt").write_bytes(b"unlisted")  # looks like ours, is not listed
    (ckpts / "round_1" / "worker_2.pt").write_bytes(b"a peer's")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{NODE}.pt").write_bytes(b"precious")
    os.rename(ckpts / "round_1", tmp_path / "moved_round_1")  # our listed round 1 now leads outside
    os.symlink(outside, ckpts / "round_1", target_is_directory=True)
    train_and_save(store, layout, [2, 3], keep_last=1)
    assert (ckpts / "round_0" / "planted.txt").read_text() == "not ours"
    assert not (ckpts / "round_0" / f"{NODE}.pt").exists()  # ours, listed, pruned
    assert (ckpts / "round_5" / f"{NODE}.pt").read_bytes() == b"unlisted"
    assert (outside / f"{NODE}.pt").read_bytes() == b"precious"
    assert (tmp_path / "moved_round_1" / "worker_2.pt").exists()
    assert sorted(read_index(store, layout, NODE).entries) == [3]
    prune_checkpoints(store, layout, NODE, 1)
    assert ckpt_rounds(layout) == [1, 3, 5]  # round 1 is the symlink to outside, still untouched


def test_a_forged_index_lists_nothing_and_prunes_nothing(store, layout, tmp_path):
    saved = train_and_save(store, layout, [0, 1])
    forger = make_store(layout, tmp_path, key=secrets.token_bytes(32))
    forged = CheckpointIndex(node_id=NODE, checkpoints=())  # "we wrote nothing": prune everything?
    forger.write_json_atomic(index_path(layout, NODE), forged.to_json())
    assert read_index(store, layout, NODE).state == "invalid"
    fresh = Policy(seed=5)
    assert fresh.load(store, layout) is None  # a forged index is trusted for nothing, not even loading
    policy = Policy()
    policy.step()
    assert policy.save(store, layout, 2, keep_last=1)
    assert ckpt_rounds(layout) == [0, 1, 2]  # nothing deleted on the forged index's word
    assert sorted(read_index(store, layout, NODE).entries) == [2]  # a fresh, valid index from here on
    assert saved[1] != policy.weights()


# -- an experiment from before the index --------------------------------------------------------------------
def test_a_deleted_index_loads_nothing_while_signatures_are_required(store, layout):
    train_and_save(store, layout, [0, 1], keep_last=10)
    index_path(layout, NODE).unlink()  # someone deleted it, perhaps to get a planted .pt loaded
    with capture_logs() as logs:
        assert Policy(seed=5).load(store, layout) is None
    assert any(e["event"] == "checkpoint_unlisted" for e in logs)


def test_an_experiment_without_an_index_resumes_as_before_bounded_by_the_round(layout, tmp_path):
    store = make_store(layout, tmp_path, required=False)  # an older experiment needs unsigned files accepted
    saved = train_and_save(store, layout, [0, 1, 2, 3], keep_last=10)
    index_path(layout, NODE).unlink()  # what the previous version left: .pt files only
    state = RoundState(experiment="exp", round=2, stage=0, started_at=1.0, updated_at=1.0, finished=False,
                       max_rounds=100)
    store.write_json_atomic(layout.state_file(), state.to_json())
    fresh = Policy(seed=5)
    with capture_logs() as logs:
        restored = fresh.load(store, layout)
    assert restored.round == 2 and fresh.weights() == saved[2]  # round 3 is past the swarm's round: not ours
    assert any(e["event"] == "checkpoint_ahead_of_round" for e in logs)
    fresh.step()
    assert fresh.save(store, layout, 3, keep_last=1)  # the first save writes the index, overwriting round 3
    assert read_index(store, layout, NODE).state == "valid"
    assert ckpt_rounds(layout) == [0, 1, 2, 3]  # the old files are not listed: never deleted
    again = Policy(seed=6)
    assert again.load(store, layout).round == 3 and again.weights() == fresh.weights()


def test_index_schema_refuses_hostile_contents():
    entry = {"round": 1, "size": 10, "sha256": "a" * 64, "written_at": 1.0}
    good = {"schema_version": 1, "node_id": NODE, "checkpoints": [entry]}
    assert CheckpointIndex.from_json(good, expect_node=NODE).checkpoints[0].round == 1
    for bad in ({**good, "checkpoints": [entry, entry]}, {**good, "node_id": "../x"},
                {**good, "checkpoints": [{**entry, "sha256": "z" * 64}]},
                {**good, "checkpoints": [{**entry, "round": -1}]},
                {**good, "checkpoints": [{**entry, "size": True}]}, {**good, "schema_version": 2}):
        with pytest.raises(SchemaError):
            CheckpointIndex.from_json(bad)
    with pytest.raises(SchemaError):
        CheckpointIndex.from_json(good, expect_node="worker_2")
    assert CheckpointIndex.from_json(CheckpointIndex.from_json(good).to_json()) == CheckpointIndex.from_json(good)


def test_saving_over_a_path_the_store_refuses_fails_cleanly(store, layout, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rmdir(layout.root / "checkpoints")
    os.symlink(outside, layout.root / "checkpoints", target_is_directory=True)
    policy = Policy()
    with capture_logs() as logs:
        assert not policy.save(store, layout, 0)
    assert any(e["event"] == "checkpoint_failed" for e in logs)
    assert list(Path(outside).iterdir()) == []


def test_a_round_dir_planted_as_a_symlink_out_does_not_stop_a_resume(store, layout, tmp_path):
    saved = train_and_save(store, layout, [0, 1])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{NODE}.pt").write_bytes(torch_bytes(payload_of(Policy(seed=9), 7)))
    os.symlink(outside, layout.root / "checkpoints" / "round_7", target_is_directory=True)
    fresh = Policy(seed=5)
    restored = fresh.load(store, layout)
    assert restored.round == 1 and fresh.weights() == saved[1]
