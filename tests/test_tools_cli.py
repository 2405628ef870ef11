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


def test_a_cut_forced_call_is_reported_and_fails(tiny_dir, tmp_path, tiny):
    from mlx_mistral.budget import minimal_call_tokens

    long = {"name": "note", "parameters": {"type": "object", "properties": {
        "text": {"type": "string", "minLength": 60}}, "required": ["text"]}}
    tools = tmp_path / "long.json"
    tools.write_text(json.dumps([long]))
    need = minimal_call_tokens(tiny[1], {"type": "function", "function": long})
    for seed in range(3):
        r = CliRunner().invoke(cli, [str(a) for a in (
            "generate", "-m", tiny_dir, "-p", "Note it", "--tools", tools, "--tool-choice", "required",
            "--temp", "1", "--seed", seed, "-n", need + 2)])
        if r.exit_code == 0:  # the call fit: printed as tool_calls
            assert json.loads(r.stdout)[0]["function"]["name"] == "note"
        else:  # cut: said on stderr, no raw call text on stdout
            assert r.exit_code == 1 and "cut" in r.stderr and '"arguments"' not in r.stdout



def test_a_cut_reply_is_said_on_stderr(capsys):
    import pytest

    from mlx_mistral.cli.commands import _report_cut

    _report_cut("length", "auto")  # a cut text reply: a note, and success
    assert "cut" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _report_cut("length", "required")
    assert e.value.code == 1 and "unfinished tool call was dropped" in capsys.readouterr().err
    _report_cut("tool_calls", "required")
    assert capsys.readouterr().err == ""
