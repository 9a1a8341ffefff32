"""The transformers server's pure parts: turning tokens into text deltas (stop strings,
incomplete characters), reading requests, and finding the GGUF file. No torch here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from control_plane.endpoints.engines.openai_http import ApiError
from control_plane.endpoints.engines.transformers_server import (
    TextStream,
    parse_request,
    resolve_gguf_file,
)

# Token id -> text; 9 and 10 are the two halves of one UTF-8 character.
PIECES = {1: "Hello", 2: ",", 3: " world", 4: "!", 5: " END", 6: "DING", 7: " E", 8: "N"}
EURO = "€".encode()


def decode(ids: list[int]) -> str:
    raw = b"".join(EURO[:2] if i == 9 else EURO[2:] if i == 10 else PIECES[i].encode() for i in ids)
    return raw.decode(errors="replace")


def run(tokens: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    deltas: list[str] = []
    stream = TextStream(decode, stop, deltas.append)
    stopped = False
    for token in tokens:
        if stream.add(token):
            stopped = True
            break
    stream.finish()
    return deltas, stopped


class TestTextStream:
    def test_emits_each_token_as_it_comes(self) -> None:
        assert run([1, 2, 3, 4]) == (["Hello", ",", " world", "!"], False)

    def test_ends_the_text_before_a_stop_string(self) -> None:
        deltas, stopped = run([1, 3, 5, 4], stop=(" END",))
        assert (deltas, stopped) == (["Hello", " world"], True)

    def test_holds_back_what_may_begin_a_stop_string(self) -> None:
        deltas: list[str] = []
        stream = TextStream(decode, (" END",), deltas.append)
        stream.add(1)
        assert not stream.add(7)  # " E" could begin " END"
        assert deltas == ["Hello"]
        assert stream.add(8) is False  # " EN" still could
        assert stream.add(3) is False  # " EN world" cannot any more
        assert "".join(deltas) == "Hello EN world"

    def test_a_stop_string_across_tokens(self) -> None:
        assert run([1, 7, 8, 6], stop=(" ENDING",)) == (["Hello"], True)

    def test_the_earliest_of_several_stop_strings(self) -> None:
        assert run([1, 2, 3, 4], stop=("!", ",")) == (["Hello"], True)

    def test_held_back_text_is_flushed_at_the_end(self) -> None:
        assert "".join(run([1, 7], stop=(" END",))[0]) == "Hello E"

    def test_an_incomplete_character_waits_for_its_end(self) -> None:
        deltas: list[str] = []
        stream = TextStream(decode, (), deltas.append)
        stream.add(1)
        stream.add(9)
        assert deltas == ["Hello"]
        stream.add(10)
        assert deltas == ["Hello", "€"]


def parse(body: dict[str, Any], chat: bool = True) -> Any:
    return parse_request(json.dumps(body).encode(), chat, "m")


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class TestParseRequest:
    def test_defaults(self) -> None:
        request = parse(CHAT)
        assert request.messages == [{"role": "user", "content": "hi"}]
        assert request.max_tokens is None
        assert (request.sampling.temperature, request.sampling.top_p) == (1.0, 1.0)
        assert request.sampling.seed is None
        assert request.sampling.stop == ()
        assert not request.stream
        assert not request.include_usage

    def test_sampling_and_streaming_options(self) -> None:
        request = parse(
            {
                **CHAT,
                "max_completion_tokens": 7,
                "max_tokens": 9,
                "temperature": 0,
                "top_p": 0.5,
                "seed": -1,
                "stop": "\n",
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        assert request.max_tokens == 7
        assert request.sampling.temperature == 0
        assert request.sampling.top_p == 0.5
        assert request.sampling.seed == 2**64 - 1
        assert request.sampling.stop == ("\n",)
        assert request.stream
        assert request.include_usage

    def test_text_parts_are_joined(self) -> None:
        content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
        request = parse({**CHAT, "messages": [{"role": "user", "content": content}]})
        assert request.messages == [{"role": "user", "content": "a\nb"}]

    @pytest.mark.parametrize(
        ("prompt", "text", "ids"),
        [("once", "once", None), (["once"], "once", None), ([1, 2], None, [1, 2])],
    )
    def test_completion_prompts(self, prompt: Any, text: str | None, ids: list[int] | None) -> None:
        request = parse({"model": "m", "prompt": prompt, "max_tokens": 3}, chat=False)
        assert (request.text, request.ids, request.max_tokens) == (text, ids, 3)

    def test_an_unknown_model_is_a_404(self) -> None:
        with pytest.raises(ApiError) as caught:
            parse({**CHAT, "model": "other"})
        assert (caught.value.status, caught.value.code) == (404, "model_not_found")

    @pytest.mark.parametrize(
        ("change", "param"),
        [
            ({"messages": []}, "messages"),
            ({"messages": [{"content": "x"}]}, "messages"),
            ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"max_tokens": 1.5}, "max_tokens"),
            ({"temperature": 3}, "temperature"),
            ({"temperature": True}, "temperature"),
            ({"top_p": 0}, "top_p"),
            ({"seed": "7"}, "seed"),
            ({"stop": [""]}, "stop"),
            ({"stop": ["x"] * 17}, "stop"),
            ({"n": 2}, "n"),
            ({"logprobs": True}, "logprobs"),
            ({"tools": [{"type": "function"}]}, "tools"),
            ({"presence_penalty": 0.5}, "presence_penalty"),
            ({"stream": "yes"}, "stream"),
            ({"model": 3}, "model"),
        ],
    )
    def test_bad_fields_are_400s_naming_the_field(self, change: dict[str, Any], param: str) -> None:
        with pytest.raises(ApiError) as caught:
            parse({**CHAT, **change})
        assert (caught.value.status, caught.value.param) == (400, param)

    @pytest.mark.parametrize("prompt", [None, "", [], [1, "a"], [["a"], ["b"]]])
    def test_bad_prompts_are_400s(self, prompt: Any) -> None:
        if prompt == "":
            # An empty string parses; the server refuses the empty token list later.
            assert parse({"model": "m", "prompt": prompt}, chat=False).text == ""
            return
        with pytest.raises(ApiError) as caught:
            parse({"model": "m", "prompt": prompt}, chat=False)
        assert caught.value.param == "prompt"

    @pytest.mark.parametrize("body", [b"{nope", b"[1]"])
    def test_a_body_that_is_not_a_json_object_is_a_400(self, body: bytes) -> None:
        with pytest.raises(ApiError) as caught:
            parse_request(body, True, "m")
        assert caught.value.status == 400


class TestResolveGgufFile:
    def test_the_only_gguf_file(self, tmp_path: Path) -> None:
        (tmp_path / "m.Q4_1.gguf").write_bytes(b"")
        assert resolve_gguf_file(str(tmp_path), None) == "m.Q4_1.gguf"

    def test_a_checkpoint_without_gguf(self, tmp_path: Path) -> None:
        (tmp_path / "config.json").write_text("{}")
        assert resolve_gguf_file(str(tmp_path), None) is None

    def test_several_gguf_files_need_a_name_unless_a_checkpoint_is_there(
        self, tmp_path: Path
    ) -> None:
        (tmp_path / "a.gguf").write_bytes(b"")
        (tmp_path / "b.gguf").write_bytes(b"")
        with pytest.raises(ValueError, match="--gguf-file"):
            resolve_gguf_file(str(tmp_path), None)
        assert resolve_gguf_file(str(tmp_path), "b.gguf") == "b.gguf"
        (tmp_path / "config.json").write_text("{}")
        assert resolve_gguf_file(str(tmp_path), None) is None

    def test_a_named_file_must_exist(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            resolve_gguf_file(str(tmp_path), "missing.gguf")
