"""The built-in model ``builtin:tiny-gpt2``: a few-hundred-thousand-parameter GPT-2 and its tokenizer.

Built entirely in-process (no files, no downloads) so tests, CPU smoke runs and air-gapped machines
always have a model. The tokenizer is a byte-level BPE trained on :data:`CORPUS`, a few KB of the kind
of text reasoning-gym prompts contain (digits, arithmetic, ``<answer>`` tags, days, letters); being
byte-level it still encodes any text, just less compactly. Everything here is deterministic: the same
vocab in every process, the same weights for the same seed.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from sapo.config import BUILTIN_MODELS

EOS_TOKEN = "<|endoftext|>"  # GPT-2's name; also the bos token
PAD_TOKEN = "<|pad|>"  # distinct from eos so masks built from pad never hide a real eos
VOCAB_SIZE = 512
MODEL_MAX_LENGTH = 1024

_PROSE = """\
You are a helpful assistant. Think step by step, then give the final answer.
A conversation between User and Assistant. The user asks a question, and the Assistant solves it.
The assistant first thinks about the reasoning process in the mind and then provides the user with the answer.
Put your final answer inside the tags, for example <answer>42</answer>.
<think>Let me think about this problem step by step.</think>
<answer>7</answer>
<answer>-3.5</answer>
<answer>True</answer>
<answer>False</answer>
<answer>3/4</answer>
Calculate the following expression and return only the number.
What is the result of this calculation? Simplify the fraction to its lowest terms.
Convert the number from base 10 to base 2. Convert the binary number to decimal.
Given a matrix of zeros and ones, find the distance to the nearest zero for each cell.
Evaluate the propositional formula: P and Q or not R implies S.
If today is Monday, what day of the week is it after 10 days?
Monday Tuesday Wednesday Thursday Friday Saturday Sunday
January February March April May June July August September October November December
The answer is correct. The answer is wrong. Therefore, the answer is the sum of the numbers.
First, we add the numbers. Next, we multiply. Finally, we divide and subtract.
Question: How many letters are in the word? Answer: There are five letters.
a b c d e f g h i j k l m n o p q r s t u v w x y z
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z
0 1 2 3 4 5 6 7 8 9 10 100 1000 0.5 0.25 -1 -2 3.14 1/2 2/3
Input: 0 0 1 1 0 0 0 2 2 0 Output: 0 0 0 1 1 0 0 0 2 2
Program: ++++[>++++<-]>. What is the output of this program?
The quick brown fox jumps over the lazy dog. Please solve this and show your work.
"""


def _arithmetic_lines() -> list[str]:
    """Deterministic arithmetic facts, so digits and operators get merges of their own."""
    lines = []
    for a in range(0, 40, 3):
        for b in range(1, 30, 7):
            lines.append(f"{a} + {b} = {a + b}. {a} - {b} = {a - b}. {a} * {b} = {a * b}.")
            lines.append(f"What is {a} * {b}? <answer>{a * b}</answer>")
    return lines


CORPUS: tuple[str, ...] = tuple(_PROSE.splitlines()) + tuple(_arithmetic_lines())


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the BPE once per process; the JSON string is immutable, so sharing it is safe."""
    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level scheme: every byte has a token, so any text round-trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (about 512 tokens) with ``<|endoftext|>`` as bos/eos and ``<|pad|>``.

    Each call returns a new object, so callers may change ``padding_side`` and the like freely.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
    )


def build_tiny_gpt2(
    seed: int = 0,
    *,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    n_positions: int = MODEL_MAX_LENGTH,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """A randomly initialised float32 GPT-2 sized to :func:`build_tokenizer`, and that tokenizer.

    The weights depend only on ``seed``; the caller's global torch RNG is left as it was.
    """
    tokenizer = build_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        # GPT2Config defaults these to 50256, outside our vocab.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # No dropout: GRPO's importance ratios compare two forward passes that must agree.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):  # CPU only: the model is built on the CPU
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.float(), tokenizer


def build_builtin(name: str, seed: int) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """Build the built-in model ``name`` (one of :data:`sapo.config.BUILTIN_MODELS`) with weights from ``seed``."""
    if name == "builtin:tiny-gpt2":
        return build_tiny_gpt2(seed)
    raise ValueError(f"unknown built-in model {name!r}; allowed: {', '.join(BUILTIN_MODELS)}")
