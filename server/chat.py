"""/v1/chat/completions: a ChatCompletionRequest -> the core's job, and its updates -> `chat.completion` bodies and
chunks: an assistant message with reasoning and tool calls; streamed, the role first, then content, reasoning and
tool-call deltas."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from engine.request import Logprob
from server.completions import CompletionsApi, check_common, sampling
from server.errors import OpenAIError
from server.logprobs import TokenPieces, chat_content, entries_of
from server.protocol import ChatCompletionRequest, InvalidParameter
from server.serving import ApiFields, Choice, Job, Serving, Update
from server.structured import GrammarError, check_tools, tool_choice


class ChatApi(CompletionsApi):
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, body: ChatCompletionRequest, model_name: str, pieces: TokenPieces) -> None:
        super().__init__(body, model_name, pieces)
        max_tokens = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        self.fields = ApiFields("messages", max_tokens, "top_logprobs")
        self._started: set[int] = set()  # choices whose role chunk went out

    def _logprobs(self, c: Choice, entries: Iterable[Logprob]) -> dict[str, Any] | None:
        if c.request.params.logprobs is None:
            return None
        return {"content": chat_content(self.pieces, entries), "refusal": None}

    def choice(self, c: Choice) -> dict[str, Any]:
        content = "".join(c.content)
        message: dict[str, Any] = {"role": "assistant", "content": content or None if c.tool_calls else content,
                                   "refusal": None}  # fmt: skip
        if reasoning := "".join(c.reasoning):
            message["reasoning_content"] = reasoning
        if c.tool_calls:
            message["tool_calls"] = [call.openai() for call in c.tool_calls]
        return {"index": c.index, "message": message, "logprobs": self._logprobs(c, c.logprobs),
                "finish_reason": c.finish_reason}  # fmt: skip

    def chunk_choice(self, c: Choice, update: Update | None) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        entries = entries_of(update.event) if update is not None else ()
        if c.index not in self._started:  # the first chunk of a choice carries its role, even when empty
            self._started.add(c.index)
            delta = {"role": "assistant", "content": ""}
        elif update is None:
            return {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}
        elif not (update.content or update.reasoning or update.tool_calls or entries):
            return None
        if update is not None:
            if update.content:
                delta["content"] = delta.get("content", "") + update.content
            if update.reasoning:
                delta["reasoning_content"] = update.reasoning
            if calls := update.tool_calls:
                first = len(c.tool_calls) - len(calls)
                delta["tool_calls"] = [call.openai(first + i) for i, call in enumerate(calls)]
        return {"index": c.index, "delta": delta, "logprobs": self._logprobs(c, entries), "finish_reason": None}


def chat_job(serving: Serving, body: ChatCompletionRequest, request_id: str) -> Job:
    """Runs in a worker thread: grammars compile here, never on the event loop."""
    check_common(serving, body)
    try:
        tools = check_tools(body.tools) if body.tools is not None else {}
        choice = tool_choice(body.tool_choice, tools, body.parallel_tool_calls)
        if choice.names:
            grammar = serving.grammars.tool_calls(tools, choice)
        else:
            grammar = serving.grammars.response_format(body.response_format) if body.response_format else None
        messages = body.template_messages()
    except (GrammarError, InvalidParameter) as exc:
        raise OpenAIError(400, str(exc), "invalid_request", exc.param) from None
    offered = body.tools if tools and body.tool_choice != "none" else None
    ids = serving.chat_prompt_ids(messages, body.enable_thinking, offered)
    return serving.job(request_id, ChatApi(body, serving.model_name, serving.token_pieces), sampling(body), [ids],
                       body.requested_max_tokens, stream=body.stream, n=body.n, grammar=grammar,
                       tool_calls=bool(offered), cache_salt=body.cache_salt)  # fmt: skip
