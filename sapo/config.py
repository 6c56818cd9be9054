"""SAPO hyper-parameters: the ``sapo`` section of the experiment config and the task mix.

Each section is a frozen pydantic dataclass (:func:`sapo.validation.model`): field types and ``Field``
bounds say what is allowed, ``description`` is the help text (and the JSON Schema's). A mistake, in YAML or
in code, raises one :class:`ConfigError` that names the field and says what is allowed. This module is
pure: no torch, no files, so the supervisor can use it.

Defaults follow the SAPO paper (arXiv:2509.08721, §4 experimental setup) and Gensyn's reference GRPO
trainer (genrl ``GRPOTrainerModule``): KL beta 0, asymmetric clipping 0.2 / 0.28 ("clip-higher" from
DAPO, which the reference trainer uses), Adam with learning rate 1e-5 and no scheduler, temperature 1.0,
top_p 1.0, 256 new tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, Field

from sapo.validation import Bool, ConfigError, Float, Int, Str, choice, config_error, model, one_message

__all__ = ["AUTO_CUDA_MICRO_BATCH_TOKENS", "BUILTIN_MODELS", "ConfigError", "DEFAULT_TASKS", "SapoConfig",
           "TaskSpec", "section"]

# Models built in-process (no files, no downloads); sapo.tiny_model builds them.
BUILTIN_MODELS = ("builtin:tiny-gpt2", "builtin:tiny-gpt2-wide", "builtin:gpt2-124m")

# A config section: a frozen pydantic dataclass whose mistakes (also when built in code) raise ConfigError.
section = model(extra="forbid", error=config_error)

@section
class TaskSpec:
    """One entry of the task mix: a reasoning-gym dataset (or a built-in toy task) and its weight."""

    name: Str = Field("basic_arithmetic", description="reasoning-gym dataset name, or a built-in toy task (toy_*)")
    weight: Float = Field(1.0, gt=0.0, description="relative sampling weight")


DEFAULT_TASKS = tuple(
    TaskSpec(name)
    for name in (
        "arc_1d",
        "basic_arithmetic",
        "base_conversion",
        "bf",
        "binary_matrix",
        "calendar_arithmetic",
        "decimal_arithmetic",
        "fraction_simplification",
        "propositional_logic",
    )
)


# Padded tokens per forward/backward on CUDA: two worst-case GPT-2 rows (768-token prompt + 256 new tokens), or
# ~5 typical ones; GPT-2 small's activations for them stay well under 1 GB in bfloat16 (docs/PERFORMANCE.md).
AUTO_CUDA_MICRO_BATCH_TOKENS = 2048

AutoBool = Annotated[Union[Bool, Literal["auto"]], one_message("true, false or 'auto'")]
AutoCount = Annotated[Union[Literal["auto"], Annotated[int, Field(strict=True, ge=0)]],
                      one_message("'auto' or an integer >= 0")]


def _unique_tasks(tasks: tuple[TaskSpec, ...]) -> tuple[TaskSpec, ...]:
    names = [t.name for t in tasks]
    if not names:
        raise ValueError("must list at least one task")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique; got {names}")
    return tasks


@section
class SapoConfig:
    """The algorithm's knobs: the I/J/G split, sampling, GRPO loss and optimiser."""

    num_train_samples: Int = Field(8, ge=1, description="I: local questions per round (env NUM_TRAIN_SAMPLES)")
    num_transplant_trees: Int = Field(
        0, ge=0, description="J: external question groups taken from peers per round (env NUM_TRANSPLANT_TREES)")
    num_generations: Int = Field(8, ge=2, description="G: completions per question (env NUM_GENERATIONS)")
    max_new_tokens: Int = Field(256, ge=1, description="longest completion, in tokens")
    max_prompt_tokens: Int = Field(768, ge=8, description="prompts longer than this are cut from the left")
    temperature: Float = Field(1.0, gt=0.0, description="sampling temperature; log-probs use logits / temperature")
    top_p: Float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    learning_rate: Float = Field(1e-5, gt=0.0, description="Adam learning rate (no scheduler, as in the paper)")
    weight_decay: Float = Field(0.0, ge=0.0, description="Adam(W) weight decay")
    max_grad_norm: Float = Field(1.0, ge=0.0, description="gradient clipping norm; 0 disables")
    kl_beta: Float = Field(
        0.0, ge=0.0, description="weight of the KL penalty to a frozen reference model (0 = no reference)")
    clip_eps_low: Float = Field(0.2, ge=0.0, le=1.0, description="lower PPO clip: ratio >= 1 - eps_low")
    clip_eps_high: Float = Field(0.28, ge=0.0, description="upper PPO clip: ratio <= 1 + eps_high")
    optimizer_steps_per_round: Int = Field(1, ge=1, description="policy-gradient steps on each round's batch")
    micro_batch_size: Int = Field(
        0, ge=0, description="most sequences per forward/backward (gradients accumulate across micro-batches); "
        "0 = no row limit")
    micro_batch_tokens: AutoCount = Field(
        "auto", description="most padded tokens (rows x longest row) per forward/backward, so activation memory "
        "is bounded whatever the prompt lengths; 0 = no limit; auto = 2048 on CUDA, no limit on a CPU")
    oom_regrow_rounds: Int = Field(
        50, ge=0, description="after an out-of-memory halving, rounds without one before the micro-batch (or "
        "generate chunk) doubles back towards the configured size; 0 = never")
    gradient_checkpointing: AutoBool = Field(
        "auto", description="recompute each layer's activations in backward instead of storing them (about one "
        "more forward pass of training compute, most of the activation memory saved); auto = on for CUDA")
    optimizer: choice("auto", "adam", "adamw_sr") = Field(
        "auto", description="adam (torch's Adam/AdamW) or adamw_sr (float32 moments, bfloat16 weights updated "
        "with stochastic rounding); auto = adamw_sr for bfloat16 weights, adam otherwise")
    format_reward: Float = Field(
        0.0, ge=0.0, description="bonus for a well-formed <answer>...</answer> span (0 = off)")
    compile_generate: AutoBool = Field(
        "auto", description="sample with one reused static KV cache sized max_prompt_tokens + max_new_tokens, so "
        "that transformers compiles the decoding step with torch.compile (CUDA graphs); auto = on for CUDA, off "
        "for a CPU (where only the static cache would apply)")
    decode: choice("auto", "generate", "lean") = Field(
        "auto", description="the sampling loop: generate (transformers' generate; compiled with compile_generate) or "
        "lean (sapo/decode.py: each prompt prefilled once, then one token per step without generate's overhead; the "
        "same tokens bit for bit, and generate wherever it cannot be); auto = lean on a CPU unless compile_generate "
        "is on, generate elsewhere")
    adaptive_ij: Bool = Field(
        False, description="adapt the I/J split every round by the reward trend (J += alpha * (R - EMA(R)), I + J "
        "constant, I >= 1; the seeds' fork); logged per round in the metrics line (num_train_samples_used, "
        "num_transplant_trees_used)")
    adaptive_ij_alpha: Float = Field(2.0, gt=0.0, description="adaptive_ij: groups of J per unit of reward above "
                                     "its running average")
    adaptive_ij_beta: Float = Field(0.9, gt=0.0, lt=1.0, description="adaptive_ij: the running average's decay")
    warmup: AutoBool = Field(
        "auto", description="before the first round, one worst-case generate + loss/backward (no optimizer step), "
        "so an out-of-memory shows at start-up; auto = on for CUDA, off for CPU")
    tasks: Annotated[tuple[TaskSpec, ...], AfterValidator(_unique_tasks)] = Field(
        default_factory=lambda: DEFAULT_TASKS, description="weighted task mix")

    def __post_init__(self):
        if self.decode == "lean" and self.compile_generate is True:
            raise ValueError("decode=lean cannot go with compile_generate=true (compiled decoding runs inside "
                             "generate); set one of them to auto")

    def resolved(self, device_type: str) -> "SapoConfig":
        """This config with every ``auto`` decided for a device type ("cuda", "cpu", ...)."""
        cuda = device_type == "cuda"
        compile_generate = cuda if self.compile_generate == "auto" else self.compile_generate
        if self.decode != "auto":
            decode = self.decode
        else:  # measured in docs/PERFORMANCE.md: lean wins on a CPU; CUDA has compiled generate
            decode = "lean" if device_type == "cpu" and not compile_generate else "generate"
        return dataclasses.replace(
            self,
            micro_batch_tokens=(AUTO_CUDA_MICRO_BATCH_TOKENS if cuda else 0) if self.micro_batch_tokens == "auto"
            else self.micro_batch_tokens,
            compile_generate=compile_generate and decode == "generate",
            decode=decode,
            warmup=cuda if self.warmup == "auto" else self.warmup,
            gradient_checkpointing=cuda if self.gradient_checkpointing == "auto" else self.gradient_checkpointing,
        )
