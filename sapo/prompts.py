"""Prompts and answers: the text a question becomes, and the answer a completion gives.

The prompt (as in the SAPO paper's reasoning-gym setup and Gensyn's reference trainer) asks for the final
answer inside ``<answer>`` tags; :func:`extract_answer` reads the last such span. Pure: no torch, no I/O.
"""

from __future__ import annotations

from typing import Any

# An answer span longer than this is not an answer (it would only feed slow parsers in some scorers).
MAX_ANSWER_CHARS = 4096

_OPEN, _CLOSE = "<answer>", "</answer>"

SYSTEM_PROMPT = (
    "Given a problem, think about it step by step in a clear and specific manner. Once you have "
    "reasoned it through, give the final answer inside answer tags, like this:\n"
    "<answer>answer here</answer>\n"
    "Put only the final answer inside the tags, without explanation. When an example is provided, "
    "follow the format of the answer in that example exactly."
)


def extract_answer(completion: str) -> str | None:
    """The content of the LAST ``<answer>…</answer>`` span, stripped; None when there is none.

    The prompt (as in the SAPO paper's reasoning-gym setup and Gensyn's reference trainer) asks for the
    final answer inside answer tags; models often restate or draft an answer before the final one, so the
    last span wins. The span is the last ``</answer>`` and the last ``<answer>`` before it, so it never
    contains a tag itself: ``"<answer>a <answer>b</answer>"`` gives ``"b"``. Tags are exact and
    lowercase. No span, an unclosed tag, an empty (all-whitespace) span or one longer than
    ``MAX_ANSWER_CHARS`` all give None. Two ``rfind`` calls: linear time, no regex backtracking.
    """
    if not isinstance(completion, str):
        return None
    end = completion.rfind(_CLOSE)
    if end < 0:
        return None
    start = completion.rfind(_OPEN, 0, end)
    if start < 0:
        return None
    start += len(_OPEN)
    if end - start > MAX_ANSWER_CHARS:
        return None
    answer = completion[start:end].strip()
    return answer or None


def build_prompt(question_text: str, tokenizer: Any = None) -> str:
    """The prompt text for a question: the tokenizer's chat template if it has one, else a plain format.

    Templates that reject a system role get the system prompt folded into the user message.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question_text},
        ]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - e.g. jinja "System role not supported"
            merged = [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\n{question_text}"}]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    return f"{SYSTEM_PROMPT}\n\nQuestion: {question_text}\nAnswer:"
