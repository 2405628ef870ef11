"""Every bad option, text input, constraint or output place gets one line on stderr and a non-zero
exit from `mlx-mistral`, never a traceback. Most cases run in-process (CliRunner); the ones
that need a real stdout (a full disk, a closed pipe) run the command and are marked slow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_mistral.cli import cli

SMALL_CONTEXT = 64  # max_position_embeddings of the `short` model: room runs out within a test


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def run(args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def short(tiny_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with a 64-token context."""
    out = tmp_path_factory.mktemp("short") / "tiny-short"
    shutil.copytree(tiny_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=SMALL_CONTEXT)))
    return out


# -- option values: refused by click, before any model is read -------------------------------------

BAD_OPTIONS = [
    ["--min-p", "2"], ["--min-p", "-0.1"], ["--min-p", "nan"], ["--seed", "-1"], ["--seed", str(2**64)],
    ["--seed", "1.5"], ["--top-k", "-5"], ["--temp", "nan"], ["--temp", "inf"], ["--temp", "-1"],
    ["--temp", "-inf"], ["--top-p", "0"], ["--top-p", "1.5"], ["--top-p", "nan"], ["-n", "0"], ["-n", "-3"],
    ["-n", "many"], ["--repetition-penalty", "0"], ["--repetition-penalty", "inf"],
    ["--repetition-penalty", "nan"], ["--max-kv-size", "3"], ["--num-draft", "-1"], ["--kv-bits", "3"],
    ["--speculate", "magic"],
]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option", BAD_OPTIONS, ids=" ".join)
def test_a_bad_sampling_option_is_one_line(tiny_dir, command, option):
    r = run([command, "-m", tiny_dir, "-p", "hi", *option] if command == "generate"
            else [command, "-m", tiny_dir, *option], input="")
    assert r.exit_code == 2, r.output
    assert option[0] in one_line(r.stderr)


OTHER_BAD_OPTIONS = [
    ["bench", "--seed", "-1"], ["bench", "--seed", str(2**64)], ["bench", "-p", "0"], ["bench", "-g", "1"],
    ["bench", "--num-trials", "0"], ["bench", "--peak-gbps", "nan"], ["bench", "--peak-gbps", "inf"],
    ["bench", "--peak-gbps", "0"], ["info", "--budget-gb", "nan"], ["info", "--budget-gb", "inf"],
    ["info", "--context", "-1"], ["info", "--dtype", "int8"], ["serve", "--port", "70000"],
    ["serve", "--max-batch", "0"], ["serve", "--drain-timeout", "nan"], ["serve", "--max-tokens", "0"],
    ["synth", "OUT", "--seed", "-1"], ["synth", "OUT", "--preset", "huge"], ["chat", "--context", "0"],
    ["cache-prompt", "OUT", "--kv-bits", "2"],
]


@pytest.mark.parametrize("args", OTHER_BAD_OPTIONS, ids=" ".join)
def test_a_bad_option_of_any_command_is_one_line(tiny_dir, tmp_path, args):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    model = [] if args[0] == "synth" else ["-m", tiny_dir]
    r = run([args[0], *model, *args[1:]])
    assert r.exit_code == 2, r.output
    one_line(r.stderr)
    assert not (tmp_path / "out").exists()


# -- text that is not UTF-8 -------------------------------------------------------------------------

NOT_UTF8 = b"caf\xe9 \xff\xfe"


def test_a_prompt_argument_that_is_not_utf8_is_one_line(tiny_dir):
    # Python passes undecodable argv bytes on as lone surrogates
    r = run(["generate", "-m", tiny_dir, "-p", NOT_UTF8.decode("utf-8", "surrogateescape")])
    assert r.exit_code == 1 and "UTF-8" in one_line(r.stderr)


@pytest.mark.parametrize("option", ["--system", "--stop"])
def test_other_text_arguments_that_are_not_utf8_are_one_line(tiny_dir, option):
    r = run(["generate", "-m", tiny_dir, "-p", "hi", option, NOT_UTF8.decode("utf-8", "surrogateescape")])
    assert r.exit_code == 1 and "UTF-8" in one_line(r.stderr)


@pytest.mark.parametrize("prompt", [[], ["-p", "-"]], ids=["no -p", "-p -"])
def test_stdin_that_is_not_utf8_is_one_line(tiny_dir, prompt):
    r = run(["generate", "-m", tiny_dir, *prompt], input=NOT_UTF8)
    assert r.exit_code == 1 and "not valid UTF-8" in one_line(r.stderr)


@pytest.mark.parametrize("prompt", [["-p", ""], ["-p", "  \n "]], ids=["empty", "blank"])
def test_an_empty_prompt_is_one_line(tiny_dir, prompt):
    r = run(["generate", "-m", tiny_dir, *prompt])
    assert r.exit_code == 1 and "empty" in one_line(r.stderr)


def test_a_prompt_file_that_is_not_utf8_is_one_line(tiny_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_bytes(NOT_UTF8)
    r = run(["cache-prompt", "-m", tiny_dir, "--prompt-file", doc, tmp_path / "c"])
    assert r.exit_code == 1 and "not valid UTF-8" in one_line(r.stderr)
    assert not list(tmp_path.glob("c*"))


@pytest.mark.parametrize("what", ["missing", "folder"])
def test_an_unreadable_prompt_file_is_one_line(tiny_dir, tmp_path, what):
    path = tmp_path / "missing.txt" if what == "missing" else tmp_path
    r = run(["cache-prompt", "-m", tiny_dir, "--prompt-file", path, tmp_path / "c"])
    assert r.exit_code in (1, 2) and one_line(r.stderr)


@pytest.mark.parametrize("option", ["--tools", "--json-schema"])
@pytest.mark.parametrize("content", [NOT_UTF8, b"{not json", b"", b"[]" * 2], ids=["not utf8", "not json", "empty", "two"])
def test_a_tools_or_schema_file_that_is_not_json_is_one_line(tiny_dir, tmp_path, option, content):
    f = tmp_path / "f.json"
    f.write_bytes(content)
    r = run(["generate", "-m", tiny_dir, "-p", "hi", option, f])
    assert r.exit_code == 1, r.output
    one_line(r.stderr)


# -- constraints no reply can meet: refused before generation ------------------------------------------

RECURSIVE = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}


def nested(levels):
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


BAD_SCHEMAS = {"recursive $ref": RECURSIVE, "not everything": {"not": {}}, "empty enum": {"enum": []},
               "crossed bounds": {"type": "integer", "minimum": 3, "maximum": 1}, "nested 100": nested(100),
               "required false": {"type": "object", "properties": {"a": False}, "required": ["a"]},
               "dangling $ref": {"$ref": "#/$defs/nothing"}}


@pytest.mark.parametrize("name", list(BAD_SCHEMAS))
@pytest.mark.parametrize("option", ["--json-schema", "--tools"])
def test_an_unsatisfiable_constraint_is_one_line(tiny_dir, tmp_path, name, option):
    schema = BAD_SCHEMAS[name]
    f = tmp_path / "f.json"
    content = schema if option == "--json-schema" else [{"name": "f", "parameters": schema}]
    f.write_text(json.dumps(content))
    extra = ["--tool-choice", "required"] if option == "--tools" else []
    # a budget that holds a minimal call: the schema, not max_tokens, is what is refused
    r = run(["generate", "-m", tiny_dir, "-p", "hi", "-n", "64", option, f, *extra])
    assert r.exit_code == 1, r.output
    line = one_line(r.stderr)
    assert "schema" in line


# -- the model's context ------------------------------------------------------------------------

def test_a_prompt_longer_than_the_context_is_one_line_with_the_numbers(short):
    r = run(["generate", "-m", short, "-p", "word " * 200])
    assert r.exit_code == 1
    line = one_line(r.stderr)
    assert f"holds {SMALL_CONTEXT}" in line and "tokens" in line


def test_max_tokens_past_the_context_is_capped_with_a_note(short):
    r = run(["generate", "-m", short, "-p", "hi", "-n", "500", "--temp", "0"])
    assert r.exit_code == 0, r.output
    note = one_line(r.stderr)
    assert "-n 500 capped to" in note and f"holds {SMALL_CONTEXT}" in note
    room = int(note.split("capped to ")[1].split(":")[0])
    assert 0 < room < SMALL_CONTEXT


# -- places nothing can be written --------------------------------------------------------------

def unwritable(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    places = {"under a file": a_file / "c", "/proc": Path("/proc/mlx-mistral-test/c"), "a fifo": fifo}
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        places["read-only folder"] = locked / "c"
    return places


def test_cache_prompt_where_nothing_can_be_written_is_one_line(tiny_dir, tmp_path):
    for name, out in unwritable(tmp_path).items():
        r = run(["cache-prompt", "-m", tiny_dir, "--system", "Be brief.", out])
        assert r.exit_code == 1, (name, r.output)
        assert "cannot write the prompt cache" in one_line(r.stderr), name
    assert (tmp_path / "a-file").read_text() == "x"


def _cli(*args, **kw):
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run([sys.executable, "-m", "mlx_mistral.cli", *argv], capture_output=True,
                          timeout=120, **kw)


@pytest.mark.slow
def test_a_full_stdout_is_one_line(tiny_dir):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "mlx_mistral.cli", "generate", "-m", str(tiny_dir), "-p", "hi",
                            "-n", "4"], stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 1
    assert "No space left" in one_line(r.stderr.decode())


@pytest.mark.slow
def test_a_closed_stdout_pipe_is_one_line(tiny_dir):
    p = subprocess.Popen([sys.executable, "-m", "mlx_mistral.cli", "generate", "-m", str(tiny_dir), "-p", "hi",
                          "-n", "200", "--temp", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader leaves at once, as `| head -c0` does
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1
    assert "stdout was closed" in one_line(err.decode())


@pytest.mark.slow
def test_undecodable_argv_bytes_are_one_line(tiny_dir):
    r = _cli(b"generate", b"-m", str(tiny_dir).encode(), b"-p", NOT_UTF8)
    assert r.returncode == 1 and "UTF-8" in one_line(r.stderr.decode())


# -- chat: interruptions, open tool calls, a loaded prompt cache -------------------------------------

def _session(tiny):
    import io

    from rich.console import Console

    from mlx_mistral.cache import ConversationCache
    from mlx_mistral.cli.repl import ChatSession

    model, tok = tiny
    console = Console(file=io.StringIO(), width=200)
    return ChatSession(model, tok, sampling={"max_tokens": 12, "temperature": 0}, console=console,
                       cache=ConversationCache(model))


class _Interrupting:
    """A decoder layer that raises KeyboardInterrupt on its n-th call, as Ctrl-C inside a
    forward pass does: the layers before it have stored this step's K/V, the rest have not."""

    def __init__(self, layer, n):
        self.layer, self.n, self.calls = layer, n, 0

    def _tick(self):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt

    def __call__(self, *a, **k):
        self._tick()
        return self.layer(*a, **k)

    def ragged(self, *a, **k):
        self._tick()
        return self.layer.ragged(*a, **k)


def test_ctrl_c_during_a_reply_keeps_the_conversation_kv(tiny):
    model, _ = tiny
    s = _session(tiny)
    s.reply("Hello there, tell me a story")
    last = model.layers[-1]
    model.layers[-1] = _Interrupting(last, 5)
    try:
        s.reply("And another one please")
    finally:
        model.layers[-1] = last
    offsets = {c.offset for c in s.cache.cache}
    assert len(offsets) == 1 and offsets.pop() == len(s.cache.tokens) > 20  # not dropped
    s.reply("Thanks")
    stats = s.console.file.getvalue().strip().splitlines()[-1]
    cached = int(stats.split(" cached")[0].rsplit(" ", 1)[1])
    assert "(stopped)" in s.console.file.getvalue() and cached > 20


def test_each_result_says_how_many_calls_are_still_open(tiny):
    s = _session(tiny)
    s.messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call{i:05d}", "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in range(3)]}]
    s.pending = ["call00000", "call00001", "call00002"]
    said = []
    for _ in range(3):
        before = len(s.console.file.getvalue())
        s.answer_call('{"ok": true}')
        said.append(s.console.file.getvalue()[before:])
    assert "2 calls still open" in said[0] and "1 call still open" in said[1]
    assert "all calls answered" in said[2] and not s.pending


def test_chat_says_it_loaded_a_prompt_cache(tiny_dir, tmp_path):
    cache = tmp_path / "sys"
    assert run(["cache-prompt", "-m", tiny_dir, "--system", "Be brief.", cache]).exit_code == 0
    r = run(["chat", "-m", tiny_dir, "--prompt-cache", f"{cache}.safetensors"], input="/quit\n")
    assert r.exit_code == 0, r.output
    assert "prompt cache" in r.stdout and "loaded" in r.stdout and "a system prompt" in r.stdout


def test_chat_refuses_a_context_past_the_model(short):
    r = run(["chat", "-m", short, "--context", str(SMALL_CONTEXT + 1)], input="/quit\n")
    assert r.exit_code == 1 and str(SMALL_CONTEXT) in one_line(r.stderr)


def test_info_refuses_a_context_past_the_model_and_caps_what_fits(short):
    r = run(["info", "-m", short, "--context", str(SMALL_CONTEXT + 1)])
    assert r.exit_code == 1 and str(SMALL_CONTEXT) in one_line(r.stderr)
    r = run(["info", "-m", short])
    assert r.exit_code == 0 and f"up to {SMALL_CONTEXT} tokens" in r.stdout


def test_bench_refuses_more_tokens_than_the_context(short):
    r = run(["bench", "-m", short, "-p", "60", "-g", "10"])
    assert r.exit_code == 1 and f"context of {SMALL_CONTEXT}" in one_line(r.stderr)


def test_serve_plans_the_context_for_its_batch(tiny_dir, monkeypatch):
    from mlx_mistral import memory
    from mlx_mistral.server.app import served_context

    assert served_context(str(tiny_dir), 8) == 32768  # a few MB of weights: the whole context fits
    budget = memory.machine_budget()
    monkeypatch.setattr(memory, "machine_budget", lambda: memory.Budget(400 * 2**20, budget.ram, "a test budget"))
    one, eight = served_context(str(tiny_dir), 1), served_context(str(tiny_dir), 8)
    assert 256 <= eight < one <= 32768 and eight <= one // 8 + 1
    monkeypatch.setattr(memory, "machine_budget", lambda: memory.Budget(60 * 2**20, budget.ram, "a test budget"))
    r = run(["serve", "-m", tiny_dir, "--max-batch", "8", "--port", "0"])
    assert r.exit_code == 1 and "--max-batch" in one_line(r.stderr)
