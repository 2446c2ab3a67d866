"""One CLI mechanism: every command's flags come from its config dataclass. Its --help lists every
field with the field's docstring; every command takes --config FILE, and the flags given override
the file; --progress/--no-progress wherever there is a bar; a usage error is one line."""

import json
from dataclasses import fields

import pytest
from cli_checks import digest, in_process, one_error
from test_cli_store import make_store
from typer.testing import CliRunner

from saekit.cli.commands import field_docs
from saekit.cli.main import COMMANDS, app
from saekit.config import flag_of
from saekit.demo import DEMO_FILE, SIZES, DemoConfig
from saekit.sae import SparseAutoencoder
from saekit.store import open_store


def _help(command: str) -> str:
    """`saekit COMMAND --help`, wide enough not to wrap, with the table borders and spacing removed."""
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "1000", "TERMINAL_WIDTH": "1000"})
    assert res.exit_code == 0, res.output
    return " ".join(res.output.replace("│", " ").split())


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.name)
def test_help_lists_every_config_field_with_its_docstring(cmd):
    text, docs = _help(cmd.name), field_docs(cmd.config)
    assert "--config FILE" in text
    for f in fields(cmd.config):
        assert docs.get(f.name), f"{cmd.config.__name__}.{f.name} has no docstring to show in --help"
        assert f" {f.metadata.get('argument') or flag_of(f)} " in text, f.name
        assert docs[f.name] in text, f.name


@pytest.mark.parametrize("command", ["harvest", "train", "pursue", "eval", "dashboard", "demo", "verify", "copy"])
def test_every_command_with_a_progress_bar_has_progress_and_no_progress(command):
    assert "--progress --no-progress" in _help(command)


def test_list_flags_keep_their_singular_names():
    assert " --hook " in _help("harvest")
    assert all(f" {flag} " in _help(cmd) for flag in ("--k", "--method", "--encoder") for cmd in ("pursue", "eval"))
    assert " --method " in _help("demo") and " --json " in _help("info")


# --- a --config file works for every command, and the flags given override it ------------------


def _toml(path, **values):
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))  # JSON scalars and lists are TOML
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny store (d 8, 200 rows) and an SAE for it."""
    root = tmp_path_factory.mktemp("inputs")
    SparseAutoencoder(d_in=8, n_features=16, k=2).save(root / "sae")
    return make_store(root / "store"), root / "sae"


def config_harvest(tmp_path, inputs, capsys, monkeypatch):
    out = tmp_path / "store"
    toml = _toml(
        tmp_path / "h.toml", out=str(out), tokens=2048, shard_rows=1024, chunk_rows=256, device="cpu", progress=False
    )
    code, _, err = in_process(capsys, monkeypatch, "harvest", "--config", toml, "--tokens", 1024)
    assert code == 0, err
    st = open_store(out)
    assert (st.n_rows, st.layout.shard_rows, st.layout.chunk_rows) == (1024, 1024, 256)


def config_train(tmp_path, inputs, capsys, monkeypatch):
    settings = dict(store=str(inputs[0]), n_features=16, k=2, batch_size=32, tokens=64, device="cpu", progress=False)
    toml = _toml(tmp_path / "t.toml", **settings)
    code, _, err = in_process(capsys, monkeypatch, "train", "--config", toml, "--out", tmp_path / "run", "--k", 4)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["k"], saved["n_features"], saved["batch_size"], saved["tokens"]) == (4, 16, 32, 64)


def config_pursue(tmp_path, inputs, capsys, monkeypatch):
    # keys may be the flag names (`method`) or the field names (`methods`)
    settings = dict(store=str(inputs[0]), sae=str(inputs[1]), k=[2, 3], method=["gp"], device="cpu", progress=False)
    toml = _toml(tmp_path / "p.toml", **settings)
    code, _, err = in_process(capsys, monkeypatch, "pursue", "--config", toml, "--out", tmp_path / "o", "--k", 4)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [(e["method"], e["k"]) for e in report if e["codes"]] == [("gp", 4)]  # the flags' k list replaces the file's


def config_eval(tmp_path, inputs, capsys, monkeypatch, embedded_store):
    # eval reruns a model: the embedded store and an SAE for its d_model 128
    SparseAutoencoder(d_in=128, n_features=256, k=4).save(tmp_path / "sae")
    settings = dict(
        store=str(embedded_store),
        sae=str(tmp_path / "sae"),
        k=[2, 3],
        method=["gp"],
        sequences=2,
        device="cpu",
        progress=False,
    )
    toml = _toml(tmp_path / "e.toml", **settings)
    code, _, err = in_process(capsys, monkeypatch, "eval", "--config", toml, "--out", tmp_path / "o", "--k", 4)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [(e["method"], e["k"]) for e in report["entries"] if e["method"] == "gp"] == [("gp", 4)]
    assert report["entries"][0]["n_tokens"] == 2 * 126  # the file's --sequences 2


def config_dashboard(tmp_path, inputs, capsys, monkeypatch):
    settings = dict(store=str(inputs[0]), sae=str(inputs[1]), top=2, contexts=3, progress=False)
    toml = _toml(tmp_path / "d.toml", **settings)
    code, _, err = in_process(
        capsys, monkeypatch, "dashboard", "--config", toml, "--out", tmp_path / "o", "--contexts", 1
    )
    assert code == 0, err
    pages = sorted((tmp_path / "o").glob("latent_*.html"))
    assert len(pages) == 2  # the file's --top 2
    for page in pages:
        top = page.read_text().split("<h3>top contexts</h3>")[1].split("<h3>")[0]
        assert top.count('<div class="ctx"') == 1  # the flag's --contexts 1, not the file's 3


def config_info(tmp_path, inputs, capsys, monkeypatch):
    toml = _toml(tmp_path / "i.toml", json=True)
    code, out, err = in_process(capsys, monkeypatch, "info", inputs[0], "--config", toml)
    assert code == 0, err
    assert json.loads(out)["path"] == str(inputs[0])
    code, out, err = in_process(capsys, monkeypatch, "info", inputs[0], "--config", toml, "--no-json")
    assert code == 0 and out.startswith("store "), err


def config_verify(tmp_path, inputs, capsys, monkeypatch):
    toml = _toml(tmp_path / "v.toml", progress=True)  # a bar even though stderr is not a terminal here
    code, out, err = in_process(capsys, monkeypatch, "verify", inputs[0], "--config", toml)
    assert code == 0 and out.startswith("ok: ") and "verify: 100%" in err, err
    code, out, err = in_process(capsys, monkeypatch, "verify", inputs[0], "--config", toml, "--no-progress")
    assert code == 0 and out.startswith("ok: ") and err == ""


def config_ls(tmp_path, inputs, capsys, monkeypatch):
    # ROOT is a required argument, so the file's root is always overridden by it
    empty = tmp_path / "empty"
    empty.mkdir()
    toml = _toml(tmp_path / "l.toml", root=str(empty))
    code, out, err = in_process(capsys, monkeypatch, "ls", inputs[0].parent, "--config", toml)
    assert code == 0 and out.startswith(f"{inputs[0]}  complete"), err
    toml = _toml(tmp_path / "l2.toml", root=str(inputs[0].parent))
    code, out, err = in_process(capsys, monkeypatch, "ls", empty, "--config", toml)
    assert code == 0 and out.strip() == f"no saekit stores under {empty}", err


def config_copy(tmp_path, inputs, capsys, monkeypatch):
    toml = _toml(tmp_path / "c.toml", progress=True, threads=2)  # a bar even though stderr is not a terminal here
    code, out, err = in_process(capsys, monkeypatch, "copy", inputs[0], tmp_path / "c1", "--config", toml)
    assert code == 0 and out.startswith("copied ") and "copy: 100%" in err, err
    code, out, err = in_process(
        capsys, monkeypatch, "copy", inputs[0], tmp_path / "c2", "--config", toml, "--no-progress"
    )
    assert code == 0 and out.startswith("copied ") and err == "", err


def config_demo(tmp_path, inputs, capsys, monkeypatch):
    # A demo directory made with steps 20: the refusal names every size that differs, so it shows
    # which sizes the command took (the file's tokens and rows, the flag's steps), without a run.
    out = tmp_path / "demo"
    out.mkdir()
    made = DemoConfig(tokens=4096, steps=20, rows=256)
    (out / DEMO_FILE).write_text(json.dumps({k: getattr(made, k) for k in SIZES}))
    before = digest(out)
    toml = _toml(tmp_path / "d.toml", tokens=4096, steps=20, rows=256, out=str(out))
    code, _, err = in_process(capsys, monkeypatch, "demo", "--config", toml, "--steps", 7)
    one_error(code, err, f"{out} holds a demo run with other sizes (steps 20 -> 7);")
    assert digest(out) == before


CASES = (
    config_harvest,
    config_train,
    config_pursue,
    config_eval,
    config_dashboard,
    config_info,
    config_verify,
    config_ls,
    config_copy,
    config_demo,
)
CONFIG_CASES = {f.__name__.removeprefix("config_"): f for f in CASES}


def test_the_config_cases_cover_every_command():
    assert set(CONFIG_CASES) == {c.name for c in COMMANDS}


@pytest.mark.parametrize("command", sorted(CONFIG_CASES))
def test_a_config_file_works_for_every_command_and_flags_override_it(
    tmp_path, inputs, capsys, monkeypatch, command, request
):
    more = [request.getfixturevalue("embedded_store")] if command == "eval" else []
    CONFIG_CASES[command](tmp_path, inputs, capsys, monkeypatch, *more)


@pytest.mark.parametrize("command", ["harvest", "pursue", "demo"])
def test_an_unknown_config_key_is_one_line_naming_the_command(tmp_path, capsys, monkeypatch, command):
    toml = _toml(tmp_path / "bad.toml", tokenz=5)
    code, _, err = in_process(capsys, monkeypatch, command, "--config", toml)
    one_error(code, err, f"--config {toml} has unknown key(s) tokenz; see `saekit {command} --help` for the names")


def test_a_config_value_of_the_wrong_type_is_one_line_in_every_command(tmp_path, inputs, capsys, monkeypatch):
    toml = _toml(tmp_path / "bad.toml", k="16")
    code, _, err = in_process(capsys, monkeypatch, "pursue", "--config", toml)
    one_error(code, err, f"--config {toml}: k must be a list of integers, got '16'")
    toml = _toml(tmp_path / "bad2.toml", json="yes")
    code, _, err = in_process(capsys, monkeypatch, "info", inputs[0], "--config", toml)
    one_error(code, err, f"--config {toml}: json must be true or false, got 'yes'")


# --- usage errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, says, where",
    [
        (["pursue", "--k", "abc"], "Invalid value for '--k'", "saekit pursue"),
        (["train", "--frobnicate", "3"], "No such option: --frobnicate", "saekit train"),
        (["info"], "Missing argument 'STORE'", "saekit info"),
        (["pursue", "--k"], "Option '--k' requires an argument", "saekit pursue"),
        (["verify", "a", "b"], "Got unexpected extra argument(s) (b)", "saekit verify"),
        (["frobnicate"], "No such command 'frobnicate'", "saekit"),
    ],
)
def test_a_usage_error_is_one_line_with_exit_status_2(capsys, monkeypatch, args, says, where):
    code, out, err = in_process(capsys, monkeypatch, *args)
    assert code == 2 and out == ""
    line = one_error(code, err, says)
    assert line.endswith(f"; see {where} --help") and len(err.splitlines()) == 1, err


def test_bare_saekit_prints_the_help(capsys, monkeypatch):
    code, out, err = in_process(capsys, monkeypatch)
    assert code == 2 and "Usage: saekit [OPTIONS] COMMAND" in out and err == ""
