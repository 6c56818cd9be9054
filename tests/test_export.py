"""`swarm export`: a node's checkpoint as a Hugging Face directory that transformers loads and generates
with, and every refusal (tampered checkpoint, unknown node, unlisted round, wrong key, occupied output).

Real files throughout: the tiny model is built as a worker builds it, trained for real, checkpointed with
node.checkpoint through a signing store, and exported with the `swarm` CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness import CONFIG, Timeouts
from node.checkpoint import CheckpointEntry, CheckpointIndex, index_path, save_checkpoint
from node.config import resolve_config
from node.layout import ExperimentLayout
from node.models import load_model
from node.runtime import ensure_config_snapshot
from node.schemas import PeerRecord
from node.signing import KEY_FILE_NAME, Signer, create_key_file
from node.storage import SharedStore
from sapo.tiny_model import build_tiny_gpt2
from supervisor import cli

REPO = Path(__file__).resolve().parents[1]
NODE = "worker_1"
PROMPT = "What is 3 * 7? Put your final answer inside the tags, for example <answer>42</answer>."


class Experiment:
    """An experiment directory with its key in the runtime dir (where `swarm launch` keeps it) and a config
    file; :meth:`train` checkpoints a worker's model as the worker would."""

    def __init__(self, tmp: Path, *sets: str, extra_yaml: str = ""):
        self.tmp = tmp
        self.config_path = tmp / "exp.yaml"
        self.config_path.write_text(
            f"experiment: {{name: exp, root: {tmp / 'shared'}, seed: 7}}\n"
            "model: {name: 'builtin:tiny-gpt2', dtype: float32}\n"
            f"exchange: {{lock_dir: {tmp / 'locks'}, spool_dir: {tmp / 'spool'}}}\n" + extra_yaml)
        self.sets = list(sets)
        self.config = resolve_config(self.config_path, overrides=self.sets)
        self.key = create_key_file(tmp / "rt" / KEY_FILE_NAME)
        self.layout = ExperimentLayout.from_config(self.config)
        self.store = self.store_with(self.key)
        self.store.ensure_layout()
        ensure_config_snapshot(self.store, self.layout, self.config, NODE)

    def store_with(self, key: bytes, node: str = NODE) -> SharedStore:
        return SharedStore.from_config(self.config, node_id=node, signer=Signer(key), sleep=lambda s: None)

    def train(self, rounds, *, node: str = NODE, dtype: str = "float32", model=None) -> dict[int, dict]:
        """One real training step before each checkpoint of ``rounds``: the weights each one holds."""
        if model is None:  # as the worker loads it
            own = self.config.for_node(node)
            model = load_model(own.model.name, dtype=dtype, seed=own.model_seed()).model
        tokenizer = build_tiny_gpt2()[1]
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        ids = tokenizer(PROMPT + " <answer>21</answer>", return_tensors="pt").input_ids
        saved = {}
        for r in rounds:
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            assert save_checkpoint(self.store, self.layout, node, r, model, optimizer, keep_last=5)
            saved[r] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return saved

    def pt(self, round_: int, node: str = NODE) -> Path:
        return self.layout.checkpoint_file(round_, node)

    def export(self, capsys, *args: str) -> tuple[int, str, str]:
        """`swarm export CONFIG ...` in this process: (exit code, stdout, stderr)."""
        capsys.readouterr()  # what the test printed before (transformers' progress bars) is not the command's
        rc = cli.main(["export", str(self.config_path), *args, *[a for s in self.sets for a in ("--set", s)]])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err


@pytest.fixture
def exp(tmp_path, monkeypatch) -> Experiment:
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    for var in ("SWARM_KEY", "SWARM_KEY_FILE", "GDRIVE_PATH", "EXPERIMENT_NAME", "TEST_MODE", "MODEL_NAME"):
        monkeypatch.delenv(var, raising=False)
    return Experiment(tmp_path)


def refused(rc: int, err: str, *words: str) -> None:
    """Exit 2 with one line on stderr naming every one of ``words``."""
    assert rc == 2, err
    assert err.startswith("swarm: ") and err.strip().count("\n") == 0 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def assert_same_weights(model, weights: dict) -> None:
    ours = model.state_dict()
    assert set(ours) == set(weights)
    for key, value in weights.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


# --------------------------------------------------------------------------- the export loads and generates

def test_export_loads_with_transformers_and_generates(exp, tmp_path, capsys):
    saved = exp.train([1, 2])
    out = tmp_path / "export"
    rc, stdout, err = exp.export(capsys, "--node", NODE, "--out", str(out))
    assert rc == 0, err
    assert f"Exported {NODE} round 2" in stdout

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert_same_weights(model, saved[2])  # the newest checkpoint's weights, bit for bit
    reference = build_tiny_gpt2()[1]  # the tokenizer the worker made in-process
    for text in (PROMPT, "Monday <|endoftext|> 12 + 9 = 21 <|pad|>"):
        assert tokenizer(text).input_ids == reference(text).input_ids
    assert (tokenizer.eos_token, tokenizer.pad_token) == (reference.eos_token, reference.pad_token)

    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = generated[0, inputs.input_ids.shape[1]:]
    assert 1 <= len(new) <= 8
    assert isinstance(tokenizer.decode(new), str)

    record = json.loads((out / "sapo_export.json").read_text())
    data = exp.pt(2).read_bytes()
    assert record["node"] == NODE and record["round"] == 2 and record["experiment"] == "exp"
    assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["size"] == len(data)
    assert record["model"] == {"name": "builtin:tiny-gpt2", "dtype": "float32", "init_seed": 7}
    assert record["config_identity"]["model.name"] == "builtin:tiny-gpt2"
    assert record["config_identity"]["experiment.seed"] == 7
    assert record["config_snapshot"] == "verified"
    assert set(record["files"]) == {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temporary dir left


def test_round_option_exports_that_round_and_refuses_an_unlisted_one(exp, tmp_path, capsys):
    saved = exp.train([1, 2, 3])
    rc, _, err = exp.export(capsys, "--node", NODE, "--round", "1", "--out", str(tmp_path / "r1"))
    assert rc == 0, err
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "r1"), saved[1])
    assert json.loads((tmp_path / "r1" / "sapo_export.json").read_text())["round"] == 1

    rc, _, err = exp.export(capsys, "--node", NODE, "--round", "5", "--out", str(tmp_path / "r5"))
    refused(rc, err, "round 5 is not in worker_1's checkpoint index", "listed: 1, 2, 3")
    assert not (tmp_path / "r5").exists()


def test_dtype_auto_follows_the_checkpoint_and_a_dtype_mismatch_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.delenv("SWARM_KEY", raising=False)
    exp = Experiment(tmp_path, "model.dtype=auto")
    saved = exp.train([4], dtype="bfloat16")  # a worker on a bf16-capable GPU with dtype auto
    rc, stdout, err = exp.export(capsys, "--node", NODE, "--out", str(tmp_path / "bf16"))
    assert rc == 0, err
    assert "bfloat16" in stdout
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16), saved[4])

    exp.sets = ["model.dtype=float32"]
    rc, _, err = exp.export(capsys, "--node", NODE, "--out", str(tmp_path / "fp32"))
    refused(rc, err, "fails validation: dtype", "torch.bfloat16", "model.dtype")


def test_a_worker_with_its_own_model_exports_that_model(tmp_path, monkeypatch, capsys):
    """A heterogeneous swarm: worker_2 trains a narrower GPT-2 from a local directory (workers: entry)."""
    monkeypatch.setenv("SWARM_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.delenv("SWARM_KEY", raising=False)
    narrow_dir = tmp_path / "narrow-gpt2"
    narrow, tokenizer = build_tiny_gpt2(seed=3, n_embd=32)
    narrow.save_pretrained(narrow_dir)
    tokenizer.save_pretrained(narrow_dir)
    exp = Experiment(tmp_path, extra_yaml=f"supervisor: {{workers: 2}}\n"
                     f"workers: [{{name: worker_2, model: {{name: '{narrow_dir}', init_seed: 11}}}}]\n")
    base = exp.train([1], node="worker_1")
    own = exp.train([1], node="worker_2")
    for node, saved, width in (("worker_1", base, 64), ("worker_2", own, 32)):
        out = tmp_path / f"out-{node}"
        rc, _, err = exp.export(capsys, "--node", node, "--out", str(out))
        assert rc == 0, err
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.config.n_embd == width
        assert_same_weights(model, saved[1])
    assert json.loads((tmp_path / "out-worker_2" / "sapo_export.json").read_text())["model"]["init_seed"] == 11


# --------------------------------------------------------------------------- a checkpoint that fails validation

def test_a_tampered_checkpoint_is_refused_naming_the_check(exp, tmp_path, capsys):
    exp.train([1])
    pt = exp.pt(1)
    original = pt.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01  # one byte changed, same size
    pt.write_bytes(bytes(damaged))
    rc, _, err = exp.export(capsys, "--node", NODE, "--out", str(tmp_path / "out"))
    refused(rc, err, "checkpoints/round_1/worker_1.pt fails validation: sha256")
    assert not (tmp_path / "out").exists()

    pt.write_bytes(original + b"\0")
    rc, _, err = exp.export(capsys, "--node", NODE, "--out", str(tmp_path / "out"))
    refused(rc, err, "fails validation: size", f"the index lists {len(original)}")

    # As the user sees it from the console script: one line on stderr, exit 2.
    pt.write_bytes(bytes(damaged))
    res = subprocess.run([sys.executable, "-m", "supervisor.cli", "export", str(exp.config_path), "--node", NODE,
                          "--out", str(tmp_path / "out")], cwd=REPO, env=os.environ, capture_output=True,
                         text=True, timeout=300)
    refused(res.returncode, res.stderr, "sha256")


def test_a_listed_compressed_archive_fails_the_zip_inspection(exp, tmp_path, capsys):
    """A key holder's index listing a DEFLATE archive (sha256 right): refused before torch.load sees it."""
    exp.train([1])
    pt = exp.pt(1)
    packed = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(pt.read_bytes())) as src, \
            zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    data = packed.getvalue()
    pt.write_bytes(data)
    entry = CheckpointEntry(round=1, size=len(data), sha256=hashlib.sha256(data).hexdigest(), written_at=1.0)
    exp.store.write_json_atomic(index_path(exp.layout, NODE),
                                CheckpointIndex(node_id=NODE, checkpoints=(entry,)).to_json())
    rc, _, err = exp.export(capsys, "--node", NODE, "--out", str(tmp_path / "out"))
    refused(rc, err, "fails validation: zip inspection", "compressed")


def test_weights_of_another_model_fail_the_shape_check(exp, tmp_path, capsys):
    narrow, _ = build_tiny_gpt2(seed=1, n_embd=32)  # signed and listed, but not the config's model
    exp.train([1], model=narrow)
    rc, _, err = exp.export(capsys, "--node", NODE, "--out", str(tmp_path / "out"))
    refused(rc, err, "fails validation: shapes", "is (", "the model's is (")


# --------------------------------------------------------------------------- nodes, keys, the output dir

def test_a_missing_node_is_refused_naming_the_known_ones(exp, tmp_path, capsys):
    exp.train([1])
    rc, _, err = exp.export(capsys, "--node", "worker_9", "--out", str(tmp_path / "out"))
    refused(rc, err, "no such node 'worker_9' in experiment 'exp'", "worker_1")
    rc, _, err = exp.export(capsys, "--node", "../worker_1", "--out", str(tmp_path / "out"))
    refused(rc, err, "no such node")

    # A registered worker that has not checkpointed yet.
    record = PeerRecord(node_id="worker_2", role="worker", pid=1, host="h", started_at=1.0, heartbeat_at=1.0,
                        round=0, progress=0, status="running")
    exp.store_with(exp.key, "worker_2").write_json_atomic(exp.layout.peer_file("worker_2"), record.to_json())
    rc, _, err = exp.export(capsys, "--node", "worker_2", "--out", str(tmp_path / "out"))
    refused(rc, err, "worker_2 has no checkpoint yet")
    assert not (tmp_path / "out").exists()

    exp.sets = ["experiment.name=other"]
    rc, _, err = exp.export(capsys, "--node", NODE, "--out", str(tmp_path / "out"))
    refused(rc, err, "no experiment at", "other")


def test_key_problems_are_refused(exp, tmp_path, capsys):
    exp.train([1])
    other = tmp_path / "other.key"
    create_key_file(other)
    rc, _, err = exp.export(capsys, "--node", NODE, "--out", str(tmp_path / "out"), "--key-file", str(other))
    refused(rc, err, "checkpoints/worker_1.index.json refused (bad signature)", "--key-file")

    other.chmod(0o644)
    rc, _, err = exp.export(capsys, "--node", NODE, "--out", str(tmp_path / "out"), "--key-file", str(other))
    refused(rc, err, "experiment key", "readable by group or others")

    (tmp_path / "rt" / KEY_FILE_NAME).unlink()
    rc, _, err = exp.export(capsys, "--node", NODE, "--out", str(tmp_path / "out"))
    refused(rc, err, "no experiment key", "--key-file")
    assert not (tmp_path / "rt" / KEY_FILE_NAME).exists()  # export never creates a key

    # The right key from a file elsewhere (a copy of the supervisor's, as on another host) works.
    copy = tmp_path / "copy.key"
    copy.write_text(exp.key.hex())
    copy.chmod(0o600)
    rc, _, err = exp.export(capsys, "--node", NODE, "--out", str(tmp_path / "out"), "--key-file", str(copy))
    assert rc == 0, err


def test_an_occupied_output_dir_needs_force(exp, tmp_path, capsys):
    exp.train([1, 2])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = exp.export(capsys, "--node", NODE, "--round", "1", "--out", str(out))
    refused(rc, err, "not empty", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    rc, _, err = exp.export(capsys, "--node", NODE, "--round", "1", "--out", str(out), "--force")
    assert rc == 0, err
    # A previous export's file that this one does not write goes (it could be loaded instead of ours);
    # files no export listed stay.
    record = json.loads((out / "sapo_export.json").read_text())
    (out / "pytorch_model.bin").write_bytes(b"stale")
    record["files"].append("pytorch_model.bin")
    (out / "sapo_export.json").write_text(json.dumps(record))
    rc, _, err = exp.export(capsys, "--node", NODE, "--out", str(out), "--force")
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "mine" and not (out / "pytorch_model.bin").exists()
    assert json.loads((out / "sapo_export.json").read_text())["round"] == 2

    (tmp_path / "file").write_text("x")
    rc, _, err = exp.export(capsys, "--node", NODE, "--out", str(tmp_path / "file"), "--force")
    refused(rc, err, "is not a directory")


# --------------------------------------------------------------------------- the whole product

@pytest.mark.slow
@pytest.mark.timeout(Timeouts.of(CONFIG).budget(rounds=3) + 300)
def test_a_launched_swarm_exports_with_the_supervisors_key(make_swarm, tmp_path):
    run = make_swarm()
    assert run.run_to_end() == 0, run.output()[-3000:]
    out = tmp_path / "exported"
    res = run.cli("export", "--node", "worker_2", "--out", str(out), timeout=300)
    assert res.returncode == 0, res.stderr
    record = json.loads((out / "sapo_export.json").read_text())
    assert record["round"] == run.config.experiment.max_rounds - 1
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > inputs.input_ids.shape[1]
