"""The built-in models: ``builtin:tiny-gpt2`` (a few hundred thousand parameters), ``builtin:tiny-gpt2-wide``
(about five times as many, with a tokenizer of its own) and ``builtin:gpt2-124m``.

Built entirely in-process (no files, no downloads) so tests, CPU smoke runs and air-gapped machines
always have a model. Everything here is deterministic: the same vocab in every process, the same weights
for the same seed.

``builtin:tiny-gpt2``: 2 layers, 2 heads, 64 wide; its tokenizer is a byte-level BPE of 512 tokens trained
on :data:`CORPUS`, a few KB of the kind of text reasoning-gym prompts contain (digits, arithmetic,
``<answer>`` tags, days, letters); being byte-level it still encodes any text, just less compactly.

``builtin:tiny-gpt2-wide``: 4 layers, 4 heads, 128 wide (1,022,720 parameters), so a CPU swarm can mix two
model sizes (heterogeneous swarms); its byte-level BPE has 768 tokens, trained on the same :data:`CORPUS`,
so its token ids differ from the tiny model's and peers' completions must be re-tokenised, as with two Hub
models.

``builtin:gpt2-124m``: GPT-2 small's architecture (12 layers, 12 heads, 768 wide, 1024 positions, tied
embeddings: 124,439,808 parameters) with random weights, so GPU throughput and memory can be measured
without a download. Its tokenizer has GPT-2's vocabulary *size* (50257) but not GPT-2's vocabulary: it is
a byte-level BPE trained on :data:`CORPUS` plus :func:`_filler_lines`, ~40k pseudo-random lowercase
"words" that exist only to give the trainer enough distinct pairs to learn ~50k merges (training takes
about 1.5 s on a 2-core CPU; the whole model about 5 s, most of it the random init of 124M weights).
Most of its tokens are therefore meaningless letter strings; what matters for measurement matches GPT-2:
the embedding and LM-head shapes, and a sampled token decodes to a few characters, as GPT-2's do. Should
a ``tokenizers`` version learn fewer merges from that corpus, the vocabulary is padded with
never-produced ``<|unused_N|>`` tokens up to 50257, so the embedding always has 50257 rows and every id
decodes to some text.
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
WIDE_VOCAB_SIZE = 768
CORPUS_VOCAB_LIMIT = 900  # CORPUS alone teaches about 930 tokens; larger vocabularies train on filler too
GPT2_VOCAB_SIZE = 50257  # GPT-2's vocabulary size (50000 merges + 256 bytes + <|endoftext|>)
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

# Filler for the 50257-token vocabulary: lines x words of pseudo-random lowercase letters.
_FILLER_LINES, _FILLER_WORDS_PER_LINE = 4000, 10


def _filler_lines(count: int = _FILLER_LINES) -> list[str]:
    """Deterministic pseudo-random lowercase words (3-9 letters): enough distinct pairs for ~50k merges.

    A tiny linear congruential generator rather than ``random.Random`` so the text can never change with
    the Python version.
    """
    letters = "abcdefghijklmnopqrstuvwxyz"
    state = 20250911
    lines = []
    for _ in range(count):
        words = []
        for _ in range(_FILLER_WORDS_PER_LINE):
            state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
            length = 3 + (state >> 33) % 7
            chars = []
            for _ in range(length):
                state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
                chars.append(letters[(state >> 33) % 26])
            words.append("".join(chars))
        lines.append(" ".join(words))
    return lines


@functools.lru_cache(maxsize=3)
def _tokenizer_json(vocab_size: int = VOCAB_SIZE) -> str:
    """Train the BPE once per process and size; the JSON string is immutable, so sharing it is safe."""
    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level scheme: every byte has a token, so any text round-trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = CORPUS if vocab_size <= CORPUS_VOCAB_LIMIT else CORPUS + tuple(_filler_lines())
    tok.train_from_iterator(corpus, trainer=trainer)
    missing = vocab_size - tok.get_vocab_size()
    if vocab_size > VOCAB_SIZE and missing > 0:
        # Never produced by the BPE; only here so that the embedding has exactly ``vocab_size`` rows.
        tok.add_tokens([f"<|unused_{i}|>" for i in range(missing)])
    return tok.to_str()


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer with ``<|endoftext|>`` as bos/eos and ``<|pad|>``.

    ``vocab_size`` is :data:`VOCAB_SIZE` (512, the tiny model's; about 512 tokens), :data:`WIDE_VOCAB_SIZE`
    (768, the wide tiny model's) or :data:`GPT2_VOCAB_SIZE` (exactly 50257, see the module docstring). Each call returns a new object, so
    callers may change ``padding_side`` and the like freely.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
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
    vocab_size: int = VOCAB_SIZE,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """A randomly initialised float32 GPT-2 sized to :func:`build_tokenizer` (``vocab_size``), and that tokenizer.

    The weights depend only on ``seed``; the caller's global torch RNG is left as it was.
    """
    tokenizer = build_tokenizer(vocab_size)
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


def build_gpt2_124m(seed: int = 0) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """GPT-2 small's shape (12 layers, 12 heads, 768 wide, 1024 positions, vocab 50257), random float32
    weights from ``seed``, and the 50257-token in-process tokenizer (not GPT-2's; see the module docstring)."""
    return build_tiny_gpt2(seed, n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=GPT2_VOCAB_SIZE)


def build_tiny_gpt2_wide(seed: int = 0) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """The wide tiny model (4 layers, 4 heads, 128 wide) with its 768-token tokenizer, random weights from ``seed``."""
    return build_tiny_gpt2(seed, n_layer=4, n_head=4, n_embd=128, vocab_size=WIDE_VOCAB_SIZE)


def build_builtin(name: str, seed: int) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """Build the built-in model ``name`` (one of :data:`sapo.config.BUILTIN_MODELS`) with weights from ``seed``."""
    if name == "builtin:tiny-gpt2":
        return build_tiny_gpt2(seed)
    if name == "builtin:tiny-gpt2-wide":
        return build_tiny_gpt2_wide(seed)
    if name == "builtin:gpt2-124m":
        return build_gpt2_124m(seed)
    raise ValueError(f"unknown built-in model {name!r}; allowed: {', '.join(BUILTIN_MODELS)}")
