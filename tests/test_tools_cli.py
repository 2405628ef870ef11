"""`--tools`, `--tool-choice` and `--json-schema` on the command line, and `/result` in chat."""

from __future__ import annotations

import json

import jsonschema
from click.testing import CliRunner

from mlx_mistral.cli import cli

WEATHER = {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def test_generate_forced_call_prints_openai_tool_calls(tiny_dir, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))  # bare function definitions are accepted
    r = run("generate", "-m", tiny_dir, "-p", "Weather in Paris?", "--tools", tools, "--tool-choice", "required",
            "--temp", "1", "--seed", "2", "-n", "400")
    assert r.exit_code == 0, r.output
    calls = json.loads(r.output)
    assert calls[0]["type"] == "function" and calls[0]["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), WEATHER["parameters"])


def test_generate_json_schema_reply_validates(tiny_dir, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    r = run("generate", "-m", tiny_dir, "-p", "A digit?", "--json-schema", path, "--temp", "1", "--seed", "0",
            "-n", "60")
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.output), schema)


def test_bad_tool_flags_are_one_line_errors(tiny_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for args, message in [
        (["--tools", bad], "not valid JSON"),
        (["--tools", tmp_path / "missing.json"], "cannot read tools file"),
        (["--tool-choice", "required"], "--tool-choice needs --tools"),
    ]:
        r = run("generate", "-m", tiny_dir, "-p", "hi", "-n", "2", *args)
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output


def test_chat_shows_calls_and_takes_results(tiny_dir, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": WEATHER}]))
    # more results than calls (at most 8): the first ones answer the calls, the last finds none
    script = "Weather in Paris?\n" + "/result {\"temp_c\": 21}\n" * 9 + "/quit\n"
    r = run("chat", "-m", tiny_dir, "--tools", tools, "--tool-choice", "get_weather", "--temp", "1",
            "--seed", "1", "-n", "300", input=script)
    assert r.exit_code == 0, r.output
    assert "tool call" in r.output and "get_weather" in r.output  # the panel
    assert "no tool call is waiting" in r.output
    assert r.output.count("tokens/s (prompt") == 2  # the call, then the reply to its result
