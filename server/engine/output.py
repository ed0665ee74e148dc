"""Per-request output processing: incremental detokenization, stop strings and the text held back until decided.

Per generated token, :class:`OutputProcessor` decodes only a short window of recent token ids and searches only the
new text (plus a short tail of the text before it) for stop strings, so its cost per token does not grow with the
output length (re-decoding the whole output every step costs O(n) per token, O(n^2) per request).

Detokenization follows the prefix/read offset scheme of Hugging Face text-generation-inference (also used by
vLLM): decode ``ids[prefix:read]`` (text already streamed, kept as context) and ``ids[prefix:]``; the difference is
new text, released once it does not end in U+FFFD (an incomplete UTF-8 character; byte-fallback decoders give one
U+FFFD per byte token of it, so a run of them is held as a whole); then ``prefix`` and ``read`` advance. The
context window matters for decoders that treat the first token of a decode call specially (SentencePiece's
``Metaspace`` / ``Strip`` drop its leading space).

Text semantics (the engine's, kept from its whole-output version):

* the streamed text omits special tokens (``decode(ids, skip_special_tokens=True)``);
* stop strings are matched against the *match text*: the streamed text with each hidden special token's rendering
  (e.g. ``<|im_start|>``) put back where it was generated, so a stop string may name or contain one;
* a stop string ends the request: the text is cut before its first character (a cut inside a special token's
  rendering falls where that token sat) and the request ends at the token that completed it (if several stop
  strings are completed by the same token, the earliest occurrence wins);
* text that might be the start of a stop string is held back until decided, and so is text ending in U+FFFD;
* at the end (EOS, length, a stop token matched by id) everything not yet sent is released (:meth:`finish`).

Deliberate differences from the whole-output version (all outside valid byte-level output): a hidden special token
generated in the middle of an incomplete character is placed after that character once it completes (the old
version kept its character offset, which drifts when byte-fallback U+FFFDs collapse into one character); and a run
of U+FFFD is held back as a whole (the old version held back only one, streaming a byte-fallback decoder's
intermediate U+FFFDs). Streamed chunks may also be split differently (a held-back stop prefix is now the longest
suffix that starts any one stop string), never the text they add up to.

Where the windowed decode may differ from ``tokenizer.decode(all_ids, skip_special_tokens=True)``, see
:func:`detokenization_caveats`; for byte-level BPE tokenizers (GPT-2 / SmolLM2 / Llama 3 / Qwen style) and
SentencePiece ones whose output is valid UTF-8 the two are equal.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decoders put for bytes that are not (yet) a complete UTF-8 character

# Largest decode window (tokens) before its start moves up to the last released chunk. Bigger = fewer extra decodes
# (one per move), smaller = shorter decodes; any value >= 1 gives the same text.
_WINDOW_TOKENS = 8


def added_vocab(tokenizer) -> dict[str, int]:
    """Added / special tokens' text → id (what a stop string naming one special token matches by id)."""
    vocab: dict[str, int] = {}
    get = getattr(tokenizer, "get_added_vocab", None)
    if get is not None:
        vocab.update({str(k): int(v) for k, v in get().items()})
    for text, tid in zip(getattr(tokenizer, "all_special_tokens", ()), getattr(tokenizer, "all_special_ids", ())):
        vocab.setdefault(str(text), int(tid))
    return vocab


def hidden_special_tokens(tokenizer) -> dict[int, str]:
    """Ids that ``decode(..., skip_special_tokens=True)`` drops → their rendered text (for stop matching).

    Costs two decodes per added token: compute it once per tokenizer and share it between requests."""
    hidden: dict[int, str] = {}
    for tid in sorted(set(added_vocab(tokenizer).values())):
        try:
            shown = tokenizer.decode([tid], skip_special_tokens=False)
            if shown and not tokenizer.decode([tid], skip_special_tokens=True):
                hidden[tid] = shown
        except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode is simply not special text
            continue
    return hidden


def detokenization_caveats(tokenizer) -> list[str]:
    """Reasons the windowed decode of :class:`OutputProcessor` may differ from decoding the whole output at once
    for this tokenizer (empty: none known). Meant for one log line at start-up.

    Known cases:

    * ``clean_up_tokenization_spaces``: a WordPiece-era post-pass (``" ."`` → ``"."``) that looks across token
      boundaries, so a space already streamed could later be removed. The processor always decodes with it off;
      its text then equals ``decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)``.
      (transformers ignores the flag for BPE models anyway.)
    * slow (Python) tokenizers decode the text between added tokens in separate pieces and may join them with
      spaces (``spaces_between_special_tokens``); a window starting mid-output cannot always reproduce that.
    * byte-fallback decoders turn a *whole run* of byte tokens into one U+FFFD per byte when any of it is invalid
      UTF-8, so an invalid byte can retroactively change characters already completed (and streamed) earlier in the
      same run. Valid output is unaffected; the processor streams the window's difference
      (counted in :attr:`OutputProcessor.unstable_decodes`).
    """
    reasons = []
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        reasons.append("clean_up_tokenization_spaces is on: streamed text is decoded without it")
    if getattr(tokenizer, "is_fast", True) is False:
        reasons.append("slow tokenizer: text around added tokens may be spaced differently than a whole decode")
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is not None and "ByteFallback" in repr(decoder):
        reasons.append("byte-fallback decoder: an invalid byte can turn earlier characters of its byte run into "
                       "U+FFFD after they were streamed")
    return reasons


class OutputProcessor:
    """One request's output: turns generated token ids into streamable text and detects stop strings.

    Args:
        tokenizer: a Hugging Face tokenizer (only ``decode`` is used).
        stops: stop strings (non-empty); matched against the match text (see the module docstring).
        hidden_specials: id → rendering of the tokens that ``skip_special_tokens=True`` hides
            (:func:`hidden_special_tokens`); computed here when ``None`` (costly: share one dict).

    Per token, the cost is one decode of at most ``_WINDOW_TOKENS`` plus pending tokens (plus, every
    ``_WINDOW_TOKENS`` tokens, one more) and a stop search over ``max(len(stop)) - 1`` characters of earlier text
    plus the new text: constant in the output length. Memory is bounded the same way.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), hidden_specials: dict[int, str] | None = None) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._stops = tuple(dict.fromkeys(stops))
        self._hidden = hidden_specials if hidden_specials is not None else hidden_special_tokens(tokenizer)
        self._context = max((len(s) for s in self._stops), default=1) - 1  # match chars a new stop may start back
        # detokenizer: visible ids (hidden specials left out) from the window start on; read = released up to here
        self._window: list[int] = []
        self._read = 0
        self._window_text = ""  # decode(self._window[:self._read])
        self._pending = ""  # text of the ids after read: not released, ends in U+FFFD (or is empty)
        # hidden special tokens generated while text was pending: (visible offset when generated, rendering)
        self._floating: list[tuple[int, str]] = []
        # released text (characters): committed = decoded for good, emitted = streamed; unsent = committed[emitted:]
        self._committed = 0
        self._emitted = 0
        self._unsent = ""
        # last characters of the committed match text, and for each the visible offset it maps to (a rendering's
        # characters map to the offset of the token it stands for)
        self._tail = ""
        self._tail_vis: list[int] = []
        self._done = False
        self.stopped = False
        self.unstable_decodes = 0  # windows whose decode did not extend the previous one (see detokenization_caveats)

    @property
    def emitted_chars(self) -> int:
        """Characters of visible text returned so far by :meth:`push` / :meth:`finish`."""
        return self._emitted

    @property
    def done(self) -> bool:
        """True once a stop string ended the output or :meth:`finish` was called."""
        return self._done

    def push(self, token_id: int) -> tuple[str, bool]:
        """Take one generated token. Returns ``(text, stopped)``: the text that may be streamed now (possibly
        empty), and whether a stop string appeared — then ``text`` is the rest of the output, cut before the stop
        string, and the request ends (no :meth:`finish` needed)."""
        if self._done:
            raise RuntimeError("the output already ended")
        released = ""
        if token_id in self._hidden:
            rendering = self._hidden[token_id]
            if self._pending:
                self._floating.append((self._committed + len(self._pending), rendering))
                piece, piece_vis = "", []
            else:
                piece, piece_vis = rendering, [self._committed] * len(rendering)
        else:
            released = self._detokenize(token_id)
            piece, piece_vis = self._place(released, self._floating) if released else ("", [])
            if released:
                self._floating = []
        base = self._committed + len(released)
        if self._stops:
            pending, pending_vis = self._place(self._pending, self._floating, base) if self._pending else ("", [])
            work = self._tail + piece + pending
            hit = min((i for i in (work.find(s) for s in self._stops) if i >= 0), default=-1)
            if hit >= 0:
                cut = (self._tail_vis + piece_vis + pending_vis)[hit]
                text = (self._unsent + released + self._pending)[:max(0, cut - self._emitted)]
                self._emitted += len(text)
                self._done = self.stopped = True
                return text, True

        self._committed = base
        self._unsent += released
        upto = self._committed
        if self._stops:
            tail = self._tail + piece
            tail_vis = self._tail_vis + piece_vis
            hold = self._held_back(tail)
            if hold:
                upto = tail_vis[len(tail) - hold]
            cut = max(0, len(tail) - self._context)  # a later stop can start at most context characters back
            self._tail, self._tail_vis = tail[cut:], tail_vis[cut:]
        n = max(0, upto - self._emitted)
        text, self._unsent = self._unsent[:n], self._unsent[n:]
        self._emitted += n
        return text, False

    def finish(self) -> str:
        """End the output (EOS, length limit, a stop token matched by id): returns all text not yet streamed,
        held-back stop-string prefixes and incomplete characters included. Later calls return ``""``."""
        if self._done:
            return ""
        self._done = True
        text = self._unsent + self._pending
        self._unsent = self._pending = ""
        self._emitted += len(text)
        return text

    # --- internals -------------------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _detokenize(self, token_id: int) -> str:
        """Add a visible token; returns the newly released text (``""`` while it is incomplete) and updates
        ``self._pending``. The prefix/read offset scheme of text-generation-inference."""
        self._window.append(token_id)
        text = self._decode(self._window)
        new = text[len(self._window_text):]
        if not new or new.endswith(REPLACEMENT):
            # (with byte fallback, an incomplete character at the end of a byte run shows the whole run as U+FFFD
            # for now, so the window text need not extend the released text yet)
            self._pending = new
            return ""
        if not text.startswith(self._window_text):
            self.unstable_decodes += 1
        self._pending = ""
        if len(self._window) > _WINDOW_TOKENS:  # move the window start up to this chunk; its text stays as context
            self._window = self._window[self._read:]
            self._window_text = self._decode(self._window)
        else:
            self._window_text = text
        self._read = len(self._window)
        return new

    def _place(self, text: str, floating: list[tuple[int, str]],
               base: int | None = None) -> tuple[str, list[int]]:
        """``text`` (visible, starting at offset ``base``, default: the committed length) with the floating
        renderings inserted at their offsets, clamped into the text; and each character's visible offset."""
        base = self._committed if base is None else base
        end = base + len(text)
        parts: list[str] = []
        vis: list[int] = []
        prev = base
        for offset, rendering in floating:
            offset = min(max(offset, prev), end)
            parts.append(text[prev - base:offset - base])
            vis.extend(range(prev, offset))
            parts.append(rendering)
            vis.extend([offset] * len(rendering))
            prev = offset
        parts.append(text[prev - base:])
        vis.extend(range(prev, end))
        return "".join(parts), vis

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (0: none)."""
        best = 0
        n = len(text)
        for s in self._stops:
            first = s[0]
            i = text.find(first, max(0, n - len(s) + 1))
            while 0 <= i and n - i > best:
                if s.startswith(text[i:]):
                    best = n - i
                    break
                i = text.find(first, i + 1)
        return best
