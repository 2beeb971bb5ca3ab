"""Grammars for structured output and tool calls, from OpenAI request fields, as llguidance grammars.

* `response_format` json_object / json_schema: llguidance's own JSON Schema compiler, compact separators (no free
  whitespace, so a document cannot pad itself out).
* `tool_choice` "required" or a named function: a Lark grammar for Gemma 4's call syntax,
  `<|tool_call>call:NAME{key:VALUE,...}<tool_call|>`, where strings are delimited by the `<|"|>` token, keys are
  bare, and numbers, booleans and null are JSON's (embedded as llguidance `%json` values, bounds included).

Every input is checked before anything runs, and each problem is a GrammarError naming the request parameter: an
invalid schema (jsonschema's meta-schema), keywords we cannot enforce, a `$ref` that resolves nowhere, a pattern that
is not a regex or whose repetition could explode, a grammar over llguidance's size limits. Compilation runs in the
request's worker thread (never the event loop), bounded by `LIMITS` and the size caps below.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jsonschema
import llguidance
import llguidance.hf

from engine.constraint import Constraint

try:  # Python 3.11+
    import re._parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse  # type: ignore[no-redef]

MAX_SCHEMA_BYTES = 64 * 1024  # a JSON schema, or one tool's parameters, serialised
MAX_TOOLS = 128
MAX_REPEAT = 10_000  # the most characters a pattern's counted repetitions may multiply up to
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # OpenAI's rule for function names
ARG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")  # Gemma writes argument keys bare: no ':' ',' or quotes in them
LIMITS = llguidance.LLParserLimits(max_grammar_size=500_000, max_lexer_states=50_000, initial_lexer_fuel=1_000_000,
                                   step_lexer_fuel=200_000)  # fmt: skip
STRING_DELIMITER, CALL_OPEN, CALL_CLOSE = 52, 48, 49  # <|"|>, <|tool_call>, <tool_call|>

# Enforced by the grammars; annotations that constrain nothing are allowed too.
_JSON_KEYWORDS = {"type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf", "allOf", "minimum",
                  "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems",
                  "maxItems", "additionalProperties", "$ref", "$defs", "definitions", "format", "prefixItems",
                  "multipleOf", "patternProperties", "propertyNames", "minProperties", "maxProperties"}  # fmt: skip
_TOOL_KEYWORDS = {"type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf", "minimum", "maximum",
                  "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
                  "additionalProperties", "$ref", "$defs", "definitions", "format"}  # fmt: skip
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "nullable", "deprecated",
                "readOnly", "writeOnly", "strict"}  # fmt: skip
_NUMERIC = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


class GrammarError(ValueError):
    """A response_format or tools problem: a 400 naming `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """What the reply may be: free text (`auto`, `none`), or only calls of `names` (`required`, a named one)."""

    names: tuple[str, ...]  # the callable functions; empty: unconstrained
    parallel: bool


class Grammars:
    """The tokenizer view llguidance needs (built once: about 3 s at the real vocabulary) and the grammar builders."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        stops = list(stop_token_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=stops)
        single = (hf_tokenizer.encode(text, add_special_tokens=False) for text in ('"', "}", "]", ",", "0", "1"))
        closing = [ids[0] for ids in single if len(ids) == 1]
        # Grammar-chosen tokens, best first: end the reply, close a Gemma string, JSON strings and structures.
        self.preferred = [*stops, STRING_DELIMITER, closing[0], *closing[1:3], CALL_CLOSE, *closing[3:]]

    def response_format(self, response_format: dict[str, Any]) -> str | None:
        """The grammar of an OpenAI `response_format`, or None for free text."""
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return self.json_schema({"type": "object"}, "response_format")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or "schema" not in spec:
                raise GrammarError("response_format.json_schema", "json_schema needs a name and a schema")
            return self.json_schema(spec["schema"], "response_format.json_schema.schema")
        raise GrammarError("response_format.type", "response_format type must be text, json_object or json_schema")

    def json_schema(self, schema: Any, param: str) -> str:
        if not isinstance(schema, dict):
            raise GrammarError(param, f"{param} must be a JSON schema object")
        _check_schema(schema, param, _JSON_KEYWORDS)
        return self._checked(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_COMPACT), param)

    def tool_calls(self, tools: dict[str, dict[str, Any]], choice: ToolChoice) -> str:
        """Calls of `choice.names` (one, or several if parallel) with arguments valid against their schemas."""
        rules = _LarkRules()
        calls = [f'"{n}" {rules.value(tools[n], tools[n], f"tools.{n}.parameters")}' for n in choice.names]
        rules.add("call", f'<[{CALL_OPEN}]> "call:" ({" | ".join(calls)}) <[{CALL_CLOSE}]>')
        grammar = "start: call" + ("+" if choice.parallel else "") + "\n" + rules.text()
        return self._checked(llguidance.LLMatcher.grammar_from_lark(grammar), "tools")

    def constraint(self, grammar: str, max_tokens: int) -> Constraint:
        """A fresh matcher per choice: each walks its own reply."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=LIMITS)
        if matcher.is_error():
            raise GrammarError("response_format", f"the grammar cannot be used: {matcher.get_error()}")
        return Constraint(matcher, self.preferred, reserve=min(64, max(8, max_tokens // 4)))

    def _checked(self, grammar: str, param: str) -> str:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer, limits=LIMITS)
        if failed:
            raise GrammarError(param, f"{param}: {messages[0]}")
        return grammar


_COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def _check_schema(schema: dict[str, Any], param: str, keywords: set[str]) -> None:
    """Meta-schema validity, size, supported keywords, and patterns that are regexes of bounded repetition."""
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise GrammarError(param, f"{param} is larger than {MAX_SCHEMA_BYTES} bytes")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise GrammarError(param, f"{param} is not a valid JSON schema: {exc.message}") from None
    todo: list[tuple[str, Any]] = [(param, schema)]
    while todo:
        path, node = todo.pop()
        if isinstance(node, list):
            todo.extend((f"{path}[{i}]", item) for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key not in keywords | _ANNOTATIONS:
                raise GrammarError(path, f"{path}: the JSON schema keyword {key!r} is not supported")
            if key == "pattern":
                _check_pattern(value, f"{path}.pattern")
            if key in ("properties", "$defs", "definitions", "patternProperties"):
                todo.extend((f"{path}.{key}.{name}", sub) for name, sub in value.items())
            elif key in ("items", "anyOf", "oneOf", "allOf", "additionalProperties", "prefixItems", "propertyNames"):
                todo.append((f"{path}.{key}", value))


def _check_pattern(pattern: str, param: str) -> None:
    """A regex Python can parse whose nested repetitions are bounded: a quantifier over a group that already holds an
    unbounded one (`(a+)+`) or counted repetitions multiplying past MAX_REPEAT (`(a{100}){100}`) is refused."""
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise GrammarError(param, f"{param} is not a valid regular expression: {exc}") from None

    def walk(items: Any, depth: int) -> tuple[int, bool]:  # (max repetition product, holds an unbounded repeat)
        size, unbounded = 1, False
        for op, arg in items:
            if op in (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT):
                low, high, body = arg
                inner, inner_unbounded = walk(body, depth + 1)
                is_unbounded = high == sre_parse.MAXREPEAT
                if inner_unbounded and (is_unbounded or high > 1):
                    raise GrammarError(param, f"{param} nests unbounded repetition, which is refused")
                count = low if is_unbounded else high
                size = max(size, inner * max(count, 1))
                unbounded = unbounded or is_unbounded or inner_unbounded
            elif op == sre_parse.SUBPATTERN:
                inner, inner_unbounded = walk(arg[-1], depth + 1)
                size, unbounded = max(size, inner), unbounded or inner_unbounded
            elif op == sre_parse.BRANCH:
                for branch in arg[1]:
                    inner, inner_unbounded = walk(branch, depth + 1)
                    size, unbounded = max(size, inner), unbounded or inner_unbounded
            if size > MAX_REPEAT:
                raise GrammarError(param, f"{param} repeats more than {MAX_REPEAT} times, which is refused")
        return size, unbounded

    walk(parsed, 0)


def check_tools(tools: Any, param: str = "tools") -> dict[str, dict[str, Any]]:
    """OpenAI `tools` -> {name: parameters schema}; GrammarError for anything malformed (the CVE-2025-48944 class)."""
    if not isinstance(tools, list) or not tools:
        raise GrammarError(param, f"{param} must be a non-empty list")
    if len(tools) > MAX_TOOLS:
        raise GrammarError(param, f"{param} holds more than {MAX_TOOLS} tools")
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise GrammarError(where, f'{where} must be {{"type": "function", "function": {{...}}}}')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise GrammarError(f"{where}.function.name", "function names are 1-64 of a-z, A-Z, 0-9, _, . and -")
        if name in out:
            raise GrammarError(f"{where}.function.name", f"the function {name!r} is declared twice")
        if not isinstance(function.get("description", ""), str):
            raise GrammarError(f"{where}.function.description", "a function description must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise GrammarError(f"{where}.function.parameters", "function parameters must be an object schema")
        _check_schema(parameters, f"{where}.function.parameters", _TOOL_KEYWORDS)
        out[name] = parameters
    return out


def tool_choice(choice: Any, tools: dict[str, dict[str, Any]], parallel: bool) -> ToolChoice:
    """OpenAI `tool_choice` against the declared tools."""
    if choice in (None, "auto", "none"):
        return ToolChoice((), parallel)
    if not tools:
        raise GrammarError("tool_choice", "tool_choice other than none or auto needs tools")
    if choice == "required":
        return ToolChoice(tuple(tools), parallel)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise GrammarError("tool_choice", 'tool_choice must be "none", "auto", "required" or a named function')
    if name not in tools:
        raise GrammarError("tool_choice", f"tool_choice names {name!r}, which is not among the declared tools")
    return ToolChoice((name,), parallel=False)


class _LarkRules:
    """Gemma 4 argument syntax for a JSON schema, as Lark rules: one rule per object, array and `$ref`."""

    def __init__(self) -> None:
        self._rules: dict[str, str] = {}
        self._refs: dict[str, str] = {}

    def add(self, name: str, body: str) -> str:
        self._rules[name] = body
        return name

    def text(self) -> str:
        return "".join(f"{name}: {body}\n" for name, body in self._rules.items()) + _ANY_RULES

    def _fresh(self, kind: str) -> str:
        return f"{kind}_{len(self._rules)}"

    def value(self, schema: Any, root: dict[str, Any], path: str) -> str:
        if schema is True or schema == {}:
            return "any_value"
        if not isinstance(schema, dict):
            raise GrammarError(path, f"{path}: a schema that allows nothing cannot be called")
        if "$ref" in schema:
            return self._ref(schema["$ref"], root, path)
        if "const" in schema:
            return _literal(schema["const"])
        if "enum" in schema:
            return "(" + " | ".join(_literal(v) for v in schema["enum"]) + ")"
        if alternatives := schema.get("anyOf") or schema.get("oneOf"):
            return "(" + " | ".join(self.value(s, root, f"{path}.anyOf[{i}]") for i, s in enumerate(alternatives)) + ")"
        kind = schema.get("type")
        if isinstance(kind, list):
            return "(" + " | ".join(self.value({**schema, "type": k}, root, path) for k in kind) + ")"
        if kind is None:
            return self._object(schema, root, path) if "properties" in schema else "any_value"
        if kind == "object":
            return self._object(schema, root, path)
        if kind == "array":
            return self._array(schema, root, path)
        if kind == "string":
            return f"<[{STRING_DELIMITER}]> {_string_body(schema)} <[{STRING_DELIMITER}]>"
        if kind in ("number", "integer", "boolean", "null"):  # the same text in JSON and in Gemma's syntax
            kept = {k: schema[k] for k in ("type", *_NUMERIC, "multipleOf") if k in schema}
            return "%json " + json.dumps(kept)
        raise GrammarError(path, f"{path}: unsupported type {kind!r}")

    def _ref(self, ref: Any, root: dict[str, Any], path: str) -> str:
        if ref in self._refs:
            return self._refs[ref]
        target: Any = root
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise GrammarError(path, f"{path}: only local $ref ('#/...') are supported, not {ref!r}")
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise GrammarError(path, f"{path}: $ref {ref!r} resolves to nothing")
            target = target[part]
        name = self._refs[ref] = self._fresh("ref")
        self._rules[name] = ""  # reserved: recursive references find the name
        self._rules[name] = self.value(target, root, f"{path}.$ref")
        return name

    def _object(self, schema: dict[str, Any], root: dict[str, Any], path: str) -> str:
        properties = schema.get("properties", {})
        if not properties:
            return '"{}"'  # valid for any object schema without properties, and what a call without arguments is
        required = set(schema.get("required", []))
        pairs = []
        for key in sorted(properties):  # the chat template writes arguments in key order (dictsort)
            if not ARG_KEY.fullmatch(key):
                raise GrammarError(f"{path}.properties", f"{path}: argument name {key!r} cannot be written bare")
            value = self.value(properties[key], root, f"{path}.properties.{key}")
            pairs.append((f'"{key}:" {value}', key in required))
        # Keys in order, the optional ones skippable, commas between those present: `after` follows a pair.
        first, after = '""', ""
        for pair, is_required in reversed(pairs):
            first_next, after_next = first, after
            after = f'"," {pair} {after_next}' if is_required else f'("," {pair})? {after_next}'
            first = f"{pair} {after_next}" if is_required else f"({pair} {after_next} | {first_next})"
        return self.add(self._fresh("object"), f'"{{" {first} "}}"')

    def _array(self, schema: dict[str, Any], root: dict[str, Any], path: str) -> str:
        item = self.value(schema.get("items", True), root, f"{path}.items")
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        more = f"{max(low - 1, 0)},{'' if high is None else high - 1}"
        rest = f'("," {item}){{{more}}}'
        body = f'"[" {item} {rest} "]"' if low >= 1 else f'"[" ({item} {rest})? "]"'
        if high == 0:
            body = '"[]"'
        return self.add(self._fresh("array"), body)


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return f"<[{STRING_DELIMITER}]> {json.dumps(value, ensure_ascii=False)} <[{STRING_DELIMITER}]>"
    if isinstance(value, dict):
        pairs = [f'"{k}:" {_literal(v)}' for k, v in sorted(value.items())]
        return '"{" ' + ' "," '.join(pairs) + ' "}"' if pairs else '"{}"'
    if isinstance(value, list):
        return '"[" ' + ' "," '.join(map(_literal, value)) + ' "]"' if value else '"[]"'
    return json.dumps(json.dumps(value))  # true, 1.5, null as a Lark string literal


def _string_body(schema: dict[str, Any]) -> str:
    if "pattern" in schema:  # the whole string matches, so the pattern matches somewhere in it, as JSON Schema asks
        return "/" + schema["pattern"].removeprefix("^").removesuffix("$").replace("/", "\\/") + "/"
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    return f"/(.|\\n){{{low},{'' if high is None else high}}}/" if low or high is not None else "/(.|\\n)*/"


# Any Gemma value, for schemas that leave a value open.
_ANY_RULES = rf"""any_value: any_string | %json {{"type": ["number", "boolean", "null"]}} | any_object | any_array
any_string: <[{STRING_DELIMITER}]> /(.|\n)*/ <[{STRING_DELIMITER}]>
any_object: "{{" (any_key ":" any_value ("," any_key ":" any_value)*)? "}}"
any_key: /[A-Za-z_][A-Za-z0-9_.-]*/
any_array: "[" (any_value ("," any_value)*)? "]"
"""
