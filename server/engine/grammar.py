"""Structured output: compiles a response format into a token matcher and fills each step's allowed-token bitmask.

A request with a :class:`~server.engine.types.ResponseFormat` (a JSON Schema, any JSON object, a regex or a list of
choices) gets its own matcher from llguidance (the guidance project's grammar engine, one of vLLM's and SGLang's
structured-output backends; chosen over xgrammar for its dependency weight at a per-mask cost well under a millisecond,
``bench/grammar_cost.py``). The matcher follows the row's output token by token; before every step it writes the
row's allowed tokens as one bit per vocabulary entry, and the sampler sets every other logit to ``-inf`` on the
device (:func:`server.model.sampling.apply_allowed`). Rows without a format get an all-ones row, so constrained
and free rows, different schemas and different adapters share one batch.

Bitmask layout (llguidance's and xgrammar's): ``[B, ceil(V / 32)]`` int32; token ``t`` of row ``b`` is allowed iff
bit ``t % 32`` of word ``t // 32`` is set. One host array per step, filled for all constrained rows in parallel
(llguidance's executor, off the GIL) and copied to the device in ONE transfer: no host round trip per row.

Compiling a format costs milliseconds to a few hundred milliseconds; it runs in :meth:`GrammarCompiler.matcher`
on the submitting thread (never the step loop), and the compiled matcher is cached per format and deep-copied per
request.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from server.engine.types import ResponseFormat
from server.errors import FailedPrecondition, InvalidArgument

#: Compiled formats kept for reuse (least recently used dropped first).
CACHE_SIZE = 64
#: llguidance's JSON options unless the schema's ``"x-guidance"`` key says otherwise: no free whitespace, and the
#: separators of Python's ``json.dumps`` (``", "``, ``": "``), the layout most training data uses. With free
#: whitespace (llguidance's own default) a model can pad an object with newlines until ``max_new_tokens``.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: Longest grammar error message passed on to a client (characters; llguidance's may dump its whole state).
MAX_ERROR_CHARS = 300


def short_error(message: str) -> str:
    """An llguidance error message on one line, without the parser state it may append (from a line starting with
    ``<``), at most :data:`MAX_ERROR_CHARS` characters. A regex error keeps its caret line and reason."""
    lines = []
    for line in (message or "the grammar matcher failed").strip().splitlines():
        if line.lstrip().startswith("<"):  # "<state>" and what follows: the matcher's internals
            break
        if line.strip():
            lines.append(line.strip())
    text = " ".join(lines) or "the grammar matcher failed"
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


def grammar_failure(fmt: ResponseFormat, message: str) -> InvalidArgument:
    """The error that ends a request whose format cannot go on: INVALID_ARGUMENT naming ``response_format.<kind>``
    (the grammar, not the server, is at fault: it is too complex for the lexer or leads to a dead end)."""
    return InvalidArgument(f"structured output failed: {short_error(message)}", field=f"response_format.{fmt.kind}")


def grammar_text(fmt: ResponseFormat) -> str:
    """llguidance's grammar for ``fmt``: a JSON Schema (``json_object`` = the schema ``{"type": "object"}``), a
    regex (the whole output matches it), or a Lark grammar ``start: "a" | "b"`` for choices (each choice a JSON
    string literal, so quotes, backslashes and non-ASCII text need no escaping rules of our own).

    Raises:
        FailedPrecondition: llguidance is not installed (the ``server`` extra installs it).
        InvalidArgument: the schema ``false`` (it admits no output), or a schema llguidance's JSON compiler
            rejects (field ``response_format.json_schema``).
    """
    try:
        from llguidance import LLMatcher
    except ImportError:
        raise FailedPrecondition("structured output needs llguidance (pip install 'qlora-server[server]')",
                                 field="response_format") from None
    if fmt.kind == "json_schema":
        schema = json.loads(fmt.value)  # checked by ResponseFormat.validate: an object or a boolean
        if schema is False:
            raise InvalidArgument("admits no output: the schema false matches nothing",
                                  field="response_format.json_schema")
        try:  # true (any JSON value) is the empty schema; llguidance applies options to objects only
            return LLMatcher.grammar_from_json_schema({} if schema is True else fmt.value, defaults=JSON_DEFAULTS)
        except ValueError as exc:
            raise InvalidArgument(f"does not compile: {short_error(str(exc))}",
                                  field="response_format.json_schema") from None
    if fmt.kind == "json_object":
        return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_DEFAULTS)
    if fmt.kind == "regex":
        return LLMatcher.grammar_from_regex(fmt.value)
    if fmt.kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in fmt.choices))
    raise InvalidArgument(f"unknown response format {fmt.kind!r}", field="response_format")


class GrammarCompiler:
    """Turns response formats into fresh matchers for one tokenizer and vocabulary (thread-safe).

    Args:
        tokenizer: the model's fast (Rust-backed) Hugging Face tokenizer.
        vocab_size: width ``V`` of the model's logits (tokens; may exceed the tokenizer's vocabulary: the extra
            ids are never allowed).
        eos_ids: the end-of-sequence token ids: allowed exactly when the output so far is complete.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.vocab_size = int(vocab_size)
        self.words = (self.vocab_size + 31) // 32
        self._tokenizer = tokenizer
        self._eos = sorted(int(i) for i in eos_ids)
        self._lltok = None
        self._executor = None
        self._cache: OrderedDict[ResponseFormat, object] = OrderedDict()
        self._lock = threading.Lock()

    def _llguidance_tokenizer(self):
        """llguidance's view of the tokenizer (built once, ~0.3 s for a 49k vocabulary; under ``_lock``)."""
        if self._lltok is None:
            import llguidance
            import llguidance.hf

            try:
                self._lltok = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self._eos or None)
            except ValueError as exc:  # a slow (pure Python) tokenizer
                raise FailedPrecondition(f"structured output needs a fast tokenizer: {exc}",
                                         field="response_format") from None
            self._executor = llguidance.LLExecutor()
        return self._lltok

    def token_bytes(self, token_id: int, text: str) -> bytes:
        """The exact bytes of one token (for log-probabilities: a byte-level token can be part of a character,
        whose text alone reads U+FFFD), from llguidance's view of the tokenizer, which maps byte-level BPE and
        SentencePiece byte-fallback tokens back to their bytes. Special tokens, ids outside the tokenizer, or no
        llguidance: ``text`` as UTF-8. (llguidance reserves byte 0xFF, which no UTF-8 text contains: a token of
        that byte reads as U+FFFD's bytes.) Builds the tokenizer view on first use (~0.3 s)."""
        try:
            with self._lock:
                lltok = self._llguidance_tokenizer()
            if 0 <= token_id < lltok.vocab_size and not lltok.is_special_token(token_id):
                return bytes(lltok.decode_bytes([token_id]))
        except (ImportError, FailedPrecondition):
            pass
        return text.encode("utf-8")

    def matcher(self, fmt: ResponseFormat):
        """A fresh llguidance ``LLMatcher`` for ``fmt``, at the start of the output.

        Raises:
            InvalidArgument: the schema / regex / choices do not compile, or admit no output at all (a ``$ref``
                loop, a regex matching nothing: the first step's mask allows no token); the field is
                ``response_format.<kind>`` (e.g. ``response_format.json_schema``) and the message llguidance's
                (first line).
            FailedPrecondition: llguidance is missing or the tokenizer is not a fast one.
        """
        from llguidance import LLMatcher

        with self._lock:
            template = self._cache.get(fmt)
            if template is not None:
                self._cache.move_to_end(fmt)
                return template.deep_copy()
            lltok = self._llguidance_tokenizer()
        grammar = grammar_text(fmt)
        # Compiling drops the GIL and may take a while for a large schema: not under the lock.
        template = LLMatcher(lltok, grammar, log_level=0)
        if template.is_error():
            raise InvalidArgument(f"does not compile: {short_error(template.get_error())}",
                                  field=f"response_format.{fmt.kind}")
        # The first step's mask (computed once here, then cached inside the matcher for every copy) finds a
        # grammar that admits no output: llguidance then allows only EOS and enters its error state.
        import llguidance.numpy as lnp

        first = np.zeros((1, self.words), dtype=np.int32)
        lnp.fill_next_token_bitmask(template, first, 0)
        bits = first.view(np.uint32)
        for eos in self._eos:  # at a dead end llguidance still allows EOS: look at the other tokens
            if eos < self.vocab_size:
                bits[0, eos // 32] &= np.uint32(~(1 << (eos % 32)) & 0xFFFFFFFF)
        dead = not first.any() and not template.is_accepting()
        if template.is_error() or dead or (template.is_stopped() and not template.is_accepting()):
            raise InvalidArgument(f"admits no output: {short_error(template.get_error() or 'a dead end')}",
                                  field=f"response_format.{fmt.kind}")
        with self._lock:
            self._cache[fmt] = template
            self._cache.move_to_end(fmt)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return template.deep_copy()

    def bitmask(self, matchers: Sequence[object | None]) -> tuple[np.ndarray, list[str | None]]:
        """The step's allowed-token bitmask for B rows (None = an unconstrained row).

        Returns:
            ``(mask, errors)``: ``mask`` a ``[B, ceil(V / 32)]`` int32 array (layout in the module docstring; all
            bits set for unconstrained rows), filled for the constrained rows in parallel; ``errors[b]`` is None,
            or why row ``b``'s matcher cannot go on (it is, or while computing this mask entered, an error state:
            a lexer too complex, a dead end; its request must end), in which case its mask row allows nothing.
        """
        import llguidance.numpy as lnp

        mask = np.full((len(matchers), self.words), -1, dtype=np.int32)
        errors: list[str | None] = [None] * len(matchers)
        rows = []
        for b, m in enumerate(matchers):
            if m is None:
                continue
            if m.is_error():
                errors[b] = m.get_error() or "the grammar matcher failed"
                mask[b] = 0
            else:
                rows.append((m, b))
        if rows:
            lnp.fill_next_token_bitmask_par(self._executor, rows, mask)
            for m, b in rows:
                if m.is_error():  # the mask itself found the failure (llguidance then allows only EOS)
                    errors[b] = m.get_error() or "the grammar matcher failed"
                    mask[b] = 0
        return mask, errors
