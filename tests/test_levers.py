"""The GPU performance levers, checked on the CPU: start-up warm-up, static-cache generate, attention kernel.

What a CPU can check: that each lever is off (today's behaviour) by default, that turning it on changes
nothing the algorithm depends on (weights, optimizer state, RNG, sampled tokens), and that the warm-up
really runs the worst case and takes the out-of-memory fallback. Their speed and memory are measured on a
GPU by scripts/bench_gpu.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import Timeouts
from node.config import resolve_config
from node.heartbeat import Heartbeat
from node.layout import ExperimentLayout
from node.models import load_model
from node.runtime import PeerRegistration, StopFlag
from node.storage import SharedStore
from node.worker import Worker
from sapo.config import ConfigError, SapoConfig, TaskSpec
from sapo.learner import SapoLearner
from sapo.rollouts import make_static_cache, sample_completions
from sapo.tiny_model import build_tiny_gpt2

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke-cpu.yaml"


def _sapo(**kw) -> SapoConfig:
    base = dict(num_train_samples=2, num_transplant_trees=2, num_generations=4, max_new_tokens=12,
                max_prompt_tokens=40, tasks=(TaskSpec("toy_copy"),))
    return SapoConfig(**{**base, **kw})


def _learner(**kw) -> SapoLearner:
    return SapoLearner(*build_tiny_gpt2(seed=3), _sapo(**kw))


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- configuration --------------------------------------------------------------------------------

def test_gpu_levers_are_on_for_cuda_and_off_for_a_cpu_by_default():
    cfg = resolve_config(CONFIG, environ={})
    assert (cfg.sapo.compile_generate, cfg.sapo.warmup, cfg.sapo.micro_batch_tokens) == ("auto", "auto", "auto")
    assert cfg.model.attn_implementation == "auto"
    cuda, cpu = cfg.sapo.resolved("cuda"), cfg.sapo.resolved("cpu")
    assert (cuda.compile_generate, cuda.warmup, cuda.micro_batch_tokens) == (True, True, 2048)
    assert (cpu.compile_generate, cpu.warmup, cpu.micro_batch_tokens) == (False, False, 0)
    explicit = resolve_config(CONFIG, environ={}, overrides=["sapo.compile_generate=false",
                                                             "sapo.micro_batch_tokens=512"]).sapo.resolved("cuda")
    assert (explicit.compile_generate, explicit.micro_batch_tokens) == (False, 512)


def test_decode_loop_is_lean_on_a_cpu_and_generate_on_cuda_by_default():
    cfg = resolve_config(CONFIG, environ={}).sapo
    assert cfg.decode == "auto"
    assert (cfg.resolved("cpu").decode, cfg.resolved("cuda").decode) == ("lean", "generate")
    compiled = resolve_config(CONFIG, environ={}, overrides=["sapo.compile_generate=true"]).sapo
    assert (compiled.resolved("cpu").decode, compiled.resolved("cpu").compile_generate) == ("generate", True)
    lean = resolve_config(CONFIG, environ={}, overrides=["sapo.decode=lean"]).sapo.resolved("cuda")
    assert (lean.decode, lean.compile_generate) == ("lean", False)  # lean never runs inside generate
    plain = resolve_config(CONFIG, environ={}, overrides=["sapo.decode=generate"]).sapo.resolved("cpu")
    assert (plain.decode, plain.compile_generate) == ("generate", False)


def test_decode_rejects_lean_with_compiled_generate_and_unknown_loops():
    with pytest.raises(ConfigError, match="decode=lean cannot go with compile_generate=true"):
        resolve_config(CONFIG, environ={}, overrides=["sapo.decode=lean", "sapo.compile_generate=true"])
    with pytest.raises(ConfigError, match="sapo.decode: must be one of auto, generate, lean"):
        resolve_config(CONFIG, environ={}, overrides=["sapo.decode=fast"])


@pytest.mark.parametrize("value", ["-1", "lots", "true"])
def test_micro_batch_tokens_rejects_other_values(value):
    with pytest.raises(ConfigError, match="sapo.micro_batch_tokens"):
        resolve_config(CONFIG, environ={}, overrides=[f"sapo.micro_batch_tokens={value}"])


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("auto", "auto"), ("on", True)])
def test_warmup_accepts_booleans_and_auto(value, expected):
    assert resolve_config(CONFIG, environ={}, overrides=[f"sapo.warmup={value}"]).sapo.warmup == expected


def test_warmup_rejects_other_values():
    with pytest.raises(ConfigError, match="sapo.warmup: must be true, false or 'auto'"):
        resolve_config(CONFIG, environ={}, overrides=["sapo.warmup=sometimes"])


def test_attn_implementation_choices():
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        resolve_config(CONFIG, environ={}, overrides=["model.attn_implementation=flash"])


# --- warm-up --------------------------------------------------------------------------------------

def test_warmup_runs_worst_case_and_changes_nothing():
    learner = _learner()
    before = _snapshot(learner.model)
    torch.manual_seed(1234)
    expected_next = torch.rand(4)
    torch.manual_seed(1234)
    stats = learner.warmup()
    assert torch.equal(torch.rand(4), expected_next), "the warm-up must leave the caller's RNG alone"
    after = learner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the warm-up must not change the weights"
    assert learner.optimizer.state == {}, "the optimizer must not have stepped"
    assert all(p.grad is None for p in learner.model.parameters()), "gradients must be discarded"
    cfg = learner.config
    assert stats.sequences_generated == cfg.num_train_samples * cfg.num_generations
    assert stats.sequences_trained == (cfg.num_train_samples + cfg.num_transplant_trees) * cfg.num_generations
    assert stats.prompt_tokens == cfg.max_prompt_tokens and stats.new_tokens == cfg.max_new_tokens
    assert stats.micro_batch_size == stats.sequences_trained
    assert stats.peak_bytes is None  # CPU


def test_warmup_generates_full_length_rows_and_trains_on_them(monkeypatch):
    learner = _learner()
    widths = []
    real_forward = learner.model.transformer.forward

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():  # the training pass, not generate
            widths.append(tuple(kwargs["input_ids"].shape))
        return real_forward(*args, **kwargs)

    prompt_widths = []
    real_generate = learner.model.generate

    def spy_generate(*args, **kwargs):
        mask = kwargs["attention_mask"]
        prompt_widths.extend(mask.sum(dim=1).tolist())
        return real_generate(*args, **kwargs)

    # The training pass runs the model's body (logits come from the head, completion tokens only).
    monkeypatch.setattr(learner.model.transformer, "forward", spy)
    monkeypatch.setattr(learner.model, "generate", spy_generate)
    learner.warmup()
    cfg = learner.config
    rows = (cfg.num_train_samples + cfg.num_transplant_trees) * cfg.num_generations
    assert widths == [(rows, cfg.max_prompt_tokens + cfg.max_new_tokens)]
    # Generate sees padded prompts, the longest of the full length: the case every real round has.
    assert max(prompt_widths) == cfg.max_prompt_tokens and min(prompt_widths) < cfg.max_prompt_tokens


def test_warmup_is_capped_by_the_model_positions():
    model, tok = build_tiny_gpt2(seed=3, n_positions=32)
    learner = SapoLearner(model, tok, _sapo(max_prompt_tokens=100, max_new_tokens=12))
    stats = learner.warmup()
    assert stats.prompt_tokens + stats.new_tokens == 32 and stats.new_tokens == 12


def test_warmup_out_of_memory_halves_the_micro_batch_and_keeps_it(monkeypatch):
    learner = _learner()
    real_forward = learner.model.transformer.forward

    def small_memory(*args, **kwargs):
        if torch.is_grad_enabled() and kwargs["input_ids"].shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(learner.model.transformer, "forward", small_memory)
    before = _snapshot(learner.model)
    stats = learner.warmup()
    width = learner.config.max_prompt_tokens + learner.config.max_new_tokens
    assert stats.micro_batch_size == 4 and stats.oom_halvings == 2  # 16 -> 8 -> 4 rows
    assert learner.micro.tokens == 4 * width and stats.micro_batch_tokens == 4 * width
    assert learner.optimizer.state == {}
    assert all(torch.equal(before[k], v) for k, v in learner.model.state_dict().items())


def test_warmup_generate_out_of_memory_is_raised_when_one_prompt_per_call_fails(monkeypatch):
    learner = _learner()

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (fake)")

    monkeypatch.setattr(learner.model, "generate", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        learner.warmup()


def _worker(tmp_path, *overrides) -> Worker:
    config = resolve_config(CONFIG, environ={}, overrides=[f"experiment.root={tmp_path / 'shared'}",
                                                           "exchange.fetch_timeout_s=0", *overrides])
    layout = ExperimentLayout.from_config(config)
    store = SharedStore(layout, node_id="worker_1", lock_dir=tmp_path / "locks", spool_dir=tmp_path / "spool",
                        sleep=lambda s: None, retry_attempts=2)
    store.ensure_layout()
    learner = SapoLearner(*build_tiny_gpt2(seed=1), config.sapo, experiment_seed=config.experiment.seed)
    return Worker(config, "worker_1", store=store, layout=layout, learner=learner,
                  heartbeat=Heartbeat(tmp_path / "run", "worker_1", "worker", 1.0), stop=StopFlag(),
                  peer=PeerRegistration(store, layout, "worker_1", "worker", 1.0))


def test_worker_warmup_is_off_on_cpu_by_default(tmp_path):
    assert _worker(tmp_path).warmup() is None


def test_worker_warmup_on_cpu_when_asked_records_an_event_then_trains_normally(tmp_path):
    worker = _worker(tmp_path, "sapo.warmup=true")
    before = _snapshot(worker.learner.model)
    stats = worker.warmup()
    assert stats is not None and stats.sequences_trained == 16  # (I + J) * G = (2 + 2) * 4
    assert all(torch.equal(before[k], v) for k, v in worker.learner.model.state_dict().items())
    events = [json.loads(x) for x in worker.layout.events_file("worker_1").read_text().splitlines()]
    warm = [e for e in events if e["event"] == "warmup"]
    assert len(warm) == 1 and warm[0]["sequences_trained"] == 16 and warm[0]["new_tokens"] == 16
    metrics = worker.run_round(0)  # the first real round afterwards: one optimizer step as always
    assert metrics["optimizer_steps"] in (0, 1)
    assert worker.heartbeat.record().phase == "train"


def test_worker_warmup_leaves_the_first_round_identical(tmp_path):
    """Same seed, with and without the warm-up: the first round's samples and step are the same."""
    plain = _worker(tmp_path / "a").run_round(0)
    warmed_worker = _worker(tmp_path / "b", "sapo.warmup=true")
    warmed_worker.warmup()
    warmed = warmed_worker.run_round(0)
    for key in ("reward_local", "tokens_generated", "loss", "grad_norm"):
        assert warmed[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key


# --- static KV cache for compiled decoding ---------------------------------------------------------

def test_static_cache_len_only_when_asked_and_within_positions():
    assert _learner().static_cache_len() is None
    assert _learner(compile_generate=True).static_cache_len() == 40 + 12
    model, tok = build_tiny_gpt2(seed=3, n_positions=48)
    assert SapoLearner(model, tok, _sapo(compile_generate=True)).static_cache_len() == 48


def test_static_cache_samples_the_same_tokens_as_the_dynamic_cache():
    model, tok = build_tiny_gpt2(seed=5)
    prompts = [tok("Copy this word: apple", add_special_tokens=False)["input_ids"],
               tok("What is 3 + 4? Answer in tags.", add_special_tokens=False)["input_ids"]]
    kw = dict(num_generations=3, max_new_tokens=20, temperature=1.0, top_p=1.0, seed=7)
    dynamic = sample_completions(model, tok, prompts, **kw)
    static = sample_completions(model, tok, prompts, cache=make_static_cache(model, 2 * 3, 64), **kw)
    assert [[c.token_ids for c in g] for g in static] == [[c.token_ids for c in g] for g in dynamic]


def test_learner_generate_with_compile_flag_on_cpu_matches_default():
    a, b = _learner(), _learner(compile_generate=True)
    questions = a.sample_questions("worker_1", 0)
    ga, _ = a.generate(questions, seed=11)
    gb, _ = b.generate(questions, seed=11)
    assert [[c.token_ids for c in g.completions] for g in ga] == [[c.token_ids for c in g.completions] for g in gb]


# --- attention kernel -----------------------------------------------------------------------------

def test_attention_default_is_sdpa_and_eager_gives_the_same_logits():
    sdpa = load_model("builtin:tiny-gpt2", seed=2)
    eager = load_model("builtin:tiny-gpt2", seed=2, attn_implementation="eager")
    assert sdpa.model.config._attn_implementation == "sdpa"  # transformers 5's default for GPT-2
    assert eager.model.config._attn_implementation == "eager"
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = sdpa.model(input_ids=ids, attention_mask=mask).logits
        b = eager.model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-5)


# --- mixed precision: float32 weights, bfloat16 autocast ---------------------------------------------

def test_autocast_defaults_off_and_accepts_bfloat16():
    assert resolve_config(CONFIG, environ={}).model.autocast == "none"
    cfg = resolve_config(CONFIG, environ={}, overrides=["model.autocast=bfloat16", "model.dtype=float32"])
    assert cfg.model.autocast == "bfloat16"
    with pytest.raises(ConfigError, match="model.autocast"):
        resolve_config(CONFIG, environ={}, overrides=["model.autocast=int8"])


def _trained_fraction(learner) -> float:
    """Share of the weights one GRPO step changes (a random group with reward spread)."""
    before = _snapshot(learner.model)
    groups, _ = learner.generate(learner.sample_questions("worker_1", 0), seed=3)
    for g in groups:
        g.rewards = [float(i % 2) for i in range(len(g.rewards))]
    stats = learner.train(groups)
    assert stats.optimizer_steps == 1
    after = learner.model.state_dict()
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values())


def test_bfloat16_autocast_keeps_float32_weights_that_learn():
    """Pure bfloat16 weights lose most lr-1e-5 Adam updates to rounding; fp32 weights + autocast do not."""
    fp32 = _trained_fraction(_learner(learning_rate=1e-5))
    mixed_learner = SapoLearner(*build_tiny_gpt2(seed=3), _sapo(learning_rate=1e-5), autocast=torch.bfloat16)
    mixed = _trained_fraction(mixed_learner)
    assert all(p.dtype == torch.float32 for p in mixed_learner.model.parameters())
    model, tok = build_tiny_gpt2(seed=3)
    pure = _trained_fraction(SapoLearner(model.to(torch.bfloat16), tok, _sapo(learning_rate=1e-5)))
    assert mixed > 0.9 * fp32  # the same weights move as in float32
    assert pure < 0.5 * mixed  # most bfloat16 updates round away (see docs/PERFORMANCE.md)


def test_autocast_forward_runs_in_bfloat16(monkeypatch):
    learner = SapoLearner(*build_tiny_gpt2(seed=3), _sapo(), autocast=torch.bfloat16)
    seen = []
    real = learner.model.lm_head.forward

    def spy(x):
        out = real(x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(learner.model.lm_head, "forward", spy)
    learner.warmup()
    assert seen and set(seen) == {torch.bfloat16}


LEVERS = ("experiment.max_rounds=2", "sapo.warmup=true", "sapo.compile_generate=true",
          "model.attn_implementation=eager", "model.autocast=bfloat16")


@pytest.mark.slow
@pytest.mark.timeout(Timeouts.of(CONFIG, *LEVERS).budget(rounds=2))
def test_swarm_with_warmup_and_levers_on_cpu_finishes_and_validates(make_swarm):
    """`swarm launch` with every CPU-checkable lever on: warm-up, static cache, eager attention, autocast."""
    run = make_swarm(*LEVERS)
    assert run.run_to_end() == 0, run.output()[-4000:]
    assert run.cli("validate").returncode == 0
    for worker in run.workers:
        events = [e["event"] for e in run.events(worker)]
        assert events.index("warmup") < events.index("finished")
        assert [m["round"] for m in run.metrics(worker)] == [0, 1]


# --- CPU threads: the supervisor shares the cores among CPU workers ----------------------------------

def _env_of_spawned(tmp_path, workers, environ):
    from fake_node import fake_config, write_heartbeat
    from supervisor.daemon import Supervisor
    from doubles import FakeOS
    from supervisor.sdnotify import SdNotifier

    fos = FakeOS()
    sup = Supervisor(fake_config(tmp_path / "shared", workers=workers), config_path=tmp_path / "cfg.yaml",
                     os_=fos, gpu=None, runtime_dir=tmp_path / "rt", notifier=SdNotifier(environ={}),
                     environ=environ, sample_processes=False)
    for name in sup.nodes:  # the staggered start: each node heartbeats, the next one spawns
        sup.tick()
        node = sup.nodes[name]
        write_heartbeat(sup.paths.root, name, pid=node.proc.pid, at=fos.now(), progress_at=fos.now(), role=node.role)
    return {p.args[p.args.index("--node-id") + 1]: p.env for p in fos.spawned}


def test_cpu_workers_share_the_cores(tmp_path, monkeypatch):
    import supervisor.launch as launch

    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(8)))
    envs = _env_of_spawned(tmp_path, 2, {"PATH": "/bin"})
    assert envs["coordinator"]["OMP_NUM_THREADS"] == "1"
    assert envs["worker_1"]["OMP_NUM_THREADS"] == "4" and envs["worker_2"]["OMP_NUM_THREADS"] == "4"
    assert launch.cpu_share(16) == 1  # never 0


def test_cpu_threads_set_by_the_user_win(tmp_path):
    envs = _env_of_spawned(tmp_path, 2, {"PATH": "/bin", "OMP_NUM_THREADS": "3"})
    assert {env["OMP_NUM_THREADS"] for env in envs.values()} == {"3"}
