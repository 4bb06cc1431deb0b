"""The demo model: a deterministic scripted model for trying the runtime.

It needs no LLM and says what it is. What it streams depends on the last
message:

* ``... a 5000-word essay ...``: exactly that many words (whitespace
  separated), one text delta per word;
* lines ``run: CMD`` / ``write FILE: TEXT``: ``run_shell`` / ``write_file``
  tool calls (when those tools are offered), then, once their results are in,
  a short report of them;
* lines ``call NAME: {json}``: a call of the client-defined function ``NAME``
  (only for tools the request offers);
* anything else: a short reply explaining the above.

Words are paced at ``tokens_per_second`` on a fixed schedule (word k due k
intervals after the step starts, up to 1 ms late: all streams share one trio
timer per millisecond, see ``runtime._pace``); ``None`` streams as fast as
the event loop allows, still one checkpoint per word. Usage is words in,
words out.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import TYPE_CHECKING, Final, final

import attrs
import trio

from . import _pace as pace
from ._model import (
    ModelChunk,
    ModelRequest,
    TextChunk,
    ToolCallDelta,
    ToolCallStart,
    UsageChunk,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Iterator

INTRO: Final = "This is the agent-runtime demo model, not an LLM."
_FILLER_TEXT: Final = (
    "Each word of this text is streamed as its own delta at a fixed rate, so a "
    "long request makes a long turn that you can watch, resume from any event "
    "and cancel at any point; a cancelled turn stops at once and is never "
    "billed, while a completed one is charged exactly once for its words."
)
_FILLER: Final = _FILLER_TEXT.split()
_WORDS_RE: Final = re.compile(r"(\d[\d,_]*)[\s-]*words?\b", re.IGNORECASE)
_RUN_RE: Final = re.compile(r"^\s*run:\s*(.+?)\s*$")
_WRITE_RE: Final = re.compile(r"^\s*write\s+([^:]+?)\s*:\s?(.*)$")
_CALL_RE: Final = re.compile(r"^\s*call\s+([A-Za-z0-9_.-]+)\s*:\s*(.+?)\s*$")
#: Upper bound on a requested word count, so a typo cannot stream forever.
MAX_WORDS: Final = 1_000_000


def iter_essay_words(topic: str, count: int) -> Iterator[str]:
    """The deterministic ``count`` words of a demo essay on ``topic``, lazily.

    Lazy on purpose: a 100,000-word turn must not hold (and, when cancelled,
    free in one go) a 100,000-element list.
    """
    subject = topic.split() or ["anything"]
    head = [*INTRO.split(), "Topic:", *subject[:-1], subject[-1] + "."]
    yield from head[:count]
    for i in range(count - len(head)):
        yield _FILLER[i % len(_FILLER)]


def essay_words(topic: str, count: int) -> list[str]:
    """The deterministic ``count`` words of a demo essay on ``topic``."""
    return list(iter_essay_words(topic, count))


def _counted(words: list[str]) -> tuple[int, Iterator[str]]:
    return len(words), iter(words)


def _word_count(text: str) -> int:
    return len(text.split())


@final
@attrs.define(eq=False)
class DemoModel:
    """A scripted model streaming deterministic text at a fixed rate.

    Args:
      tokens_per_second: words per second; ``None`` or 0 for no pacing.
    """

    tokens_per_second: float | None = 50.0
    name: str = "demo"

    def __attrs_post_init__(self) -> None:
        tps = self.tokens_per_second
        if tps is not None and not tps >= 0:  # also refuses NaN
            raise ValueError(f"tokens_per_second must be >= 0, not {tps!r}")

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        """Stream one step; see the module docstring for what it says."""
        messages = request.messages
        tool_names = {tool.name for tool in request.tools}
        input_words = sum(_word_count(m.content) for m in messages)
        last = messages[-1] if messages else None
        calls: list[tuple[str, str]] = []
        if last is not None and last.role == "tool":
            count, words = _counted(self._report(request))
        else:
            text = last.content if last is not None else ""
            calls = self._tool_calls(text, tool_names)
            if calls:
                count, words = _counted(f"Calling {len(calls)} tool(s).".split())
            else:
                count, words = self._answer(text)
        if request.max_output_tokens is not None:
            count = min(count, request.max_output_tokens)

        delay = 1.0 / self.tokens_per_second if self.tokens_per_second else 0.0
        start = trio.current_time()
        for i, word in enumerate(itertools.islice(words, count)):
            if delay:
                # On a fixed schedule (a late wake does not slow the rate),
                # sharing one trio timer per ms with every other stream.
                await pace.sleep_until(start + (i + 1) * delay)
            else:
                await trio.lowlevel.checkpoint()
            yield TextChunk(word if i == count - 1 else word + " ")
        done = sum(1 for m in messages if m.role == "tool")
        for n, (name, arguments) in enumerate(calls):
            call_id = f"call_{done + n}"
            yield ToolCallStart(call_id, name)
            # Stream the arguments in a few fragments, as real models do.
            step = max(1, len(arguments) // 3)
            for k in range(0, len(arguments), step):
                await trio.lowlevel.checkpoint()
                yield ToolCallDelta(call_id, arguments[k : k + step])
        yield UsageChunk(input_tokens=input_words, output_tokens=count + len(calls))

    def _answer(self, text: str) -> tuple[int, Iterator[str]]:
        match = _WORDS_RE.search(text)
        if match is not None:
            count = min(int(match.group(1).replace(",", "").replace("_", "")), MAX_WORDS)
            topic = text[match.end() :].strip(" .?!")
            topic = re.sub(
                r"^(?:(?:essay|text|story|article)\b)?\s*(?:(?:on|about)\b)?\s*", "", topic
            )
            return count, iter_essay_words(topic, count)
        said = " ".join(text.split()[:40])
        return _counted(
            (
                f"{INTRO} You said: {said!r}. Ask for 'a 300-word essay' to get a long "
                f"stream, or send lines 'run: CMD' or 'write FILE: TEXT' to call tools."
            ).split()
        )

    @staticmethod
    def _tool_calls(text: str, tool_names: set[str]) -> list[tuple[str, str]]:
        calls: list[tuple[str, str]] = []
        for line in text.splitlines():
            if (m := _RUN_RE.match(line)) and "run_shell" in tool_names:
                calls.append(("run_shell", json.dumps({"command": m.group(1)})))
            elif (m := _WRITE_RE.match(line)) and "write_file" in tool_names:
                args = {"path": m.group(1), "content": m.group(2)}
                calls.append(("write_file", json.dumps(args)))
            elif (m := _CALL_RE.match(line)) and m.group(1) in tool_names:
                calls.append((m.group(1), m.group(2)))
        return calls

    @staticmethod
    def _report(request: ModelRequest) -> list[str]:
        results = []
        for message in reversed(request.messages):
            if message.role != "tool":
                break
            first = message.content.strip().splitlines()[:1]
            results.append(f"[{message.tool_call_id}] {first[0] if first else '(no output)'}")
        results.reverse()
        return ("Tool results: " + " ".join(results)).split()
