"""The `alloy` command as a new user meets it (issue 18): an operating-system error is one line,
never a traceback (finding 7), and the README's tour runs as written (finding 10)."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest

import alloy.cli.inspect
from alloy.cli import main
from alloy.plan import Plan
from alloy.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PLAN = ["plan", "--model", "tiny-llama", "--devices", str(ROOT / "examples" / "clusters" / "workstation.json")]


def one_line(capsys, argv, code: int) -> str:
    """Run `alloy ARGV`; assert the exit code and a single stderr line without a traceback."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---- finding 7: plan --out / --png, and every verb's OSError ----------------------------------

@pytest.mark.parametrize("flag", ["--out", "--png"])
def test_plan_output_under_a_file_is_refused_before_planning(tmp_path, capsys, flag):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    err = one_line(capsys, [*PLAN, flag, blocker / "plan.out"], 2)
    assert f"{flag} {blocker / 'plan.out'}: cannot write in {blocker}" in err
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("flag", ["--out", "--png"])
def test_plan_output_onto_a_folder_is_refused(tmp_path, capsys, flag):
    (tmp_path / "kept.txt").write_text("x")
    err = one_line(capsys, [*PLAN, flag, tmp_path], 2)
    assert "exists and is not a regular file" in err and (tmp_path / "kept.txt").is_file()


def test_plan_png_into_a_missing_folder_creates_it_as_out_does(tmp_path, capsys):
    out, png = tmp_path / "a" / "plan.json", tmp_path / "b" / "plan.png"
    assert main([*PLAN, "--out", str(out), "--png", str(png)]) == 0
    assert Plan.load(out).devices and png.stat().st_size > 0


def test_plan_out_in_a_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user writes into read-only folders (root)")
        err = one_line(capsys, [*PLAN, "--out", folder / "plan.json"], 2)
        assert f"cannot write in {folder}" in err
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "No space left on device"),
                                           (errno.EROFS, "Read-only file system"),
                                           (errno.EACCES, "Permission denied")])
def test_plan_out_write_failure_is_one_line(tmp_path, capsys, monkeypatch, code, message):
    def fail(self, path):  # what the kernel answers once the checks before planning have passed
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(Plan, "save", fail)
    out = tmp_path / "plan.json"
    err = one_line(capsys, [*PLAN, "--out", out], 1)
    assert err.strip() == f"alloy plan: error: {message} ({out})"


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied", "/data/model"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/missing/x.json"),
    IsADirectoryError(errno.EISDIR, "Is a directory", "/data"),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EXDEV, "Invalid cross-device link", "/a/.staging", "/b/model"),
])
def test_every_verb_turns_an_os_error_into_one_line(capsys, monkeypatch, error):
    def run(args):
        raise error

    monkeypatch.setattr(alloy.cli.inspect, "run", run)
    err = one_line(capsys, ["inspect", "tiny-llama"], 1)
    paths = " -> ".join(p for p in (error.filename, error.filename2) if p)
    assert err.strip() == f"alloy inspect: error: {error.strerror}" + (f" ({paths})" if paths else "")


# ---- finding 10: the README's tour -------------------------------------------------------------

def tour_train_line() -> list[str]:
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("alloy train "))
    return line.split("#")[0].split()[2:]


def test_the_readme_train_line_names_a_shipped_config():
    config, *overrides = tour_train_line()
    assert (ROOT / config).is_file(), f"README's tour trains {config}, which the repo does not ship"
    resolved = load_config(ROOT / config, overrides)
    assert resolved.steps == 500 and resolved.out_dir == "runs/train"  # `alloy fuse runs/train` follows
    from alloy.train.run import resolve_model

    spec, _ = resolve_model(resolved.model)
    assert resolved.seq_len <= spec.max_seq_len and resolved.data.path == "stdlib"


@pytest.mark.parametrize("argv, expected", [
    (["--steps", "500"], {"steps": 500}),
    (["--steps=500"], {"steps": 500}),
    (["--optimizer.lr", "3e-4", "--steps=7", "--seed", "-1"], {"steps": 7, "seed": -1, "lr": 3e-4}),
    (["--tensorboard", "true", "--data.path", "notes.txt"], {"tensorboard": True, "path": "notes.txt"}),
])
@pytest.mark.parametrize("with_config", [True, False])
def test_overrides_take_key_value_and_key_space_value(capsys, argv, expected, with_config):
    # Without a config file, the 500 of `--steps 500` must not be taken for the config's path.
    config = [str(ROOT / "examples" / "train.yaml")] if with_config else []
    capsys.readouterr()
    assert main(["train", *config, *argv, "--print-config"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    flat = resolved | resolved["optimizer"] | resolved["data"]
    assert {key: flat[key] for key in expected} == expected


@pytest.mark.parametrize("argv, message", [
    (["--steps"], "'--steps' has no value"),
    (["--steps", "--seed=1"], "'--steps' has no value"),
    (["--steps", "[1,"], "not a YAML value"),
    (["--steps", "0"], "steps"),
    (["--stepz", "5"], "unknown key 'stepz'"),
])
def test_bad_overrides_are_one_line(capsys, argv, message):
    assert message in one_line(capsys, ["train", *argv, "--print-config"], 2)


def test_generate_reports_tokens_per_second(tmp_path, capsys):
    from hf_cases import build_hf, char_tokenizer

    build_hf("llama-gqa").save_pretrained(tmp_path)
    char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    argv = ["generate", "--model", str(tmp_path), "--prompt", "Hello", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert len(out) == 6 + 1  # six one-character tokens and the newline: the rate is not in the text
    rate = re.fullmatch(r"\(6 tokens, ([0-9.]+) tokens/s\)", err.strip().splitlines()[-1])
    assert rate and float(rate.group(1)) > 0, err
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    record = json.loads(out)
    assert record["tokens_per_s"] > 0 and len(record["tokens"]) == 6 and "tokens/s" not in err
