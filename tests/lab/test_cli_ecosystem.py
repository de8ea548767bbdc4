"""The ``pbs2p`` command as a user of other tools expects it: ``--version``, choices listed and checked before
loading, a required ``--model`` for compress/eval, calibration on the user's text, lm-eval tasks beyond the
bundled ones, and a compressed folder labelled from its own quantization config."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

from pbs2p_lab import assets, cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "The quick brown fox jumps over the lazy dog; the five boxing wizards jump quickly.\n" * 40


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model (the refusals must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before refusing")

    monkeypatch.setattr(assets, "load_model", refuse)


def run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse's refusals and --version
        return int(exc.code)


def one_line_error(capsys, code: int, expect: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and expect in err, err
    return err


def test_version(capsys):
    import pbs2p

    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pbs2p {pbs2p.__version__}"


def test_model_is_required_for_compress_and_eval_but_run_keeps_smollm2(capsys, no_loading):
    one_line_error(capsys, run(["compress", "--out", "x"]), "the following arguments are required: --model")
    one_line_error(capsys, run(["eval"]), "the following arguments are required: --model")
    assert cli.build_parser().parse_args(["run"]).model == "smollm2"  # scripts/main.sh: `pbs2p run` as it is


def test_choices_are_listed_and_bad_values_refused_before_loading(capsys, no_loading):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    helps = {name: sub[name].format_help() for name in ("compress", "run")}
    for text in helps.values():
        assert "{column,block,block-diag,none}" in text and "{mean,median}" in text
    for flag, bad in (("--compensation", "magic"), ("--cfs-normalize", "mode")):
        err = one_line_error(capsys, run(["compress", "--model", "tiny", "--out", "x", flag, bad]), "invalid choice")
        assert flag in err


def test_a_model_path_that_does_not_exist_is_one_line(capsys, tmp_path):
    for command in (["compress", "--out", str(tmp_path / "o")], ["eval"]):
        one_line_error(capsys, run([*command, "--model", "/nonexistent/model"]), "no such folder exists")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["eval", "--model", "tiny"], ["run", "--model", "tiny"]])
def test_an_unwritable_result_file_is_refused_before_loading(capsys, monkeypatch, tmp_path, no_loading, command):
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # as for a user without write permission
    one_line_error(capsys, run([*command, "--out", str(tmp_path / "r.json")]), "no write permission")


# ------------------------------------------------------------------------------------------- --calib-text
def test_compress_calibrates_on_a_text_file(tmp_path):
    text = tmp_path / "my_domain.txt"
    text.write_text(TEXT, encoding="utf-8")
    folder = tmp_path / "c"
    assert cli.main(["compress", "--model", "tiny", "--calib-text", str(text), "--nsamples", "2",
                     "--calib-seqlen", "32", "--no-cfs", "--tune-steps", "0", "--out", str(folder),
                     "--no-progress"]) == 0
    calibration = json.loads((folder / "pbs2p_compress.json").read_text())["calibration"]
    assert calibration["source"] == f"text file {text}" and calibration["nsamples"] == 2
    assert calibration["text_file_bytes"] == len(TEXT.encode()) and len(calibration["text_file_sha256"]) == 64


def _empty(t):
    (t / "empty.txt").write_text(" \n")
    return t / "empty.txt"


def _latin1(t):
    (t / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return t / "latin1.txt"


CALIB_TEXT_REFUSALS = {
    "missing": (lambda t: t / "absent.txt", [], "does not exist"),
    "folder": (lambda t: t, [], "is a folder, not a text file"),
    "empty": (_empty, [], "is empty"),
    "not utf-8": (_latin1, [], "is not UTF-8 text"),
    "data-free": (_empty, ["--nsamples", "0"], "act only with calibration data"),
}


@pytest.mark.parametrize("case", list(CALIB_TEXT_REFUSALS))
def test_bad_calibration_text_is_refused_before_loading(capsys, tmp_path, no_loading, case):
    make, extra, expect = CALIB_TEXT_REFUSALS[case]
    argv = ["compress", "--model", "tiny", "--calib-text", str(make(tmp_path)), *extra, "--out", str(tmp_path / "o")]
    one_line_error(capsys, run(argv), expect)
    assert not (tmp_path / "o").exists()


def test_too_little_calibration_text_is_refused_before_compressing(capsys, tmp_path):
    (tmp_path / "short.txt").write_text("only a few words here")
    argv = ["compress", "--model", "tiny", "--calib-text", str(tmp_path / "short.txt"), "--nsamples", "4",
            "--calib-seqlen", "64", "--out", str(tmp_path / "o"), "--no-progress"]
    one_line_error(capsys, run(argv), "fewer than nsamples x seqlen = 4 x 64 = 256")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------- --calib-dataset
def _jsonl(tmp_path, rows=None):
    rows = rows if rows is not None else [{"body": line, "n": i} for i, line in enumerate(TEXT.splitlines() * 4)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_compress_calibrates_on_a_dataset_like_on_its_text(tmp_path):
    """A jsonl file and a save_to_disk folder of the same rows give the tokens of the same text joined."""
    import datasets
    from safetensors.torch import load_file

    source = _jsonl(tmp_path)
    rows = [json.loads(line)["body"] for line in source.read_text().splitlines()][:30]
    datasets.Dataset.from_dict({"body": rows}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "joined.txt").write_text("\n\n".join(rows), encoding="utf-8")
    common = ["--nsamples", "2", "--calib-seqlen", "32", "--no-cfs", "--tune-steps", "0", "--no-progress"]
    digests = {}
    for name, flags in {"jsonl": ["--calib-dataset", str(source), "--calib-column", "body", "--calib-rows", "30"],
                        "saved": ["--calib-dataset", str(tmp_path / "saved"), "--calib-column", "body"],
                        "text": ["--calib-text", str(tmp_path / "joined.txt")]}.items():
        folder = tmp_path / f"out_{name}"
        assert cli.main(["compress", "--model", "tiny", *flags, *common, "--out", str(folder)]) == 0
        report = json.loads((folder / "pbs2p_compress.json").read_text())
        digests[name] = load_file(folder / "model.safetensors")
        if name == "jsonl":
            calibration = report["calibration"]
            assert calibration["source"] == f"dataset {source}" and calibration["dataset_rows"] == 30
            assert calibration["dataset_column"] == "body" and calibration["dataset_split"] == "train"
    for name in ("saved", "text"):
        assert digests[name].keys() == digests["jsonl"].keys()
        assert all(torch.equal(digests[name][k], digests["jsonl"][k]) for k in digests["jsonl"])


CALIB_DATASET_REFUSALS = {
    "missing file": (lambda t: ["--calib-dataset", str(t / "absent.jsonl")], "does not exist"),
    "no such column": (lambda t: ["--calib-dataset", str(_jsonl(t))], "has no column 'text' (it has body, n)"),
    "not text": (lambda t: ["--calib-dataset", str(_jsonl(t)), "--calib-column", "n"], "not text"),
    "empty": (lambda t: ["--calib-dataset", str(_jsonl(t, [])), "--calib-column", "body"], "cannot open"),
    "unread suffix": (lambda t: ["--calib-dataset", __file__], "datasets reads .json, .jsonl"),
    "two sources": (lambda t: ["--calib-dataset", str(_jsonl(t)), "--calib-text", __file__], "give one"),
    "column alone": (lambda t: ["--calib-column", "body"], "act only with --calib-dataset"),
    "data-free": (lambda t: ["--calib-dataset", str(_jsonl(t)), "--nsamples", "0"], "act only with calibration"),
}


@pytest.mark.parametrize("case", list(CALIB_DATASET_REFUSALS))
def test_bad_calibration_dataset_is_refused_before_loading(capsys, tmp_path, no_loading, case):
    flags, expect = CALIB_DATASET_REFUSALS[case]
    one_line_error(capsys, run(["compress", "--model", "tiny", *flags(tmp_path), "--out", str(tmp_path / "o")]),
                   expect)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ --tasks
def _yaml_task(tmp_path):
    rows = [{"question": f"Is {i} even?", "label": int(i % 2 == 0)} for i in range(6)]
    (tmp_path / "parity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "parity.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_parity
        dataset_path: json
        dataset_kwargs:
          data_files:
            validation: {tmp_path / "parity.jsonl"}
        validation_split: validation
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}} Answer:"
        doc_to_choice: ["no", "yes"]
        doc_to_target: label
        metric_list:
          - metric: acc
        """))
    return tmp_path / "parity.yaml"


def test_tasks_take_an_lm_eval_task_yaml_next_to_a_bundled_task(tmp_path):
    out = tmp_path / "r.json"
    tasks = f"rte,{_yaml_task(tmp_path)}"
    assert cli.main(["eval", "--model", "tiny", "--no-ppl", "--tasks", tasks, "--limit", "4", "--out", str(out),
                     "--no-progress"]) == 0
    scores = json.loads(out.read_text())["entries"][0]["zeroshot"]["tasks"]
    assert scores["tiny_parity"]["n"] == 4 and 0 <= scores["tiny_parity"]["acc"] <= 1
    assert scores["rte"]["n"] == 4


@pytest.mark.parametrize("task", ["no_such_task_xyz", "lambada_openai"])  # unknown; known but data not here
def test_tasks_lm_eval_cannot_load_are_refused_before_loading(capsys, tmp_path, no_loading, task):
    err = one_line_error(capsys, run(["eval", "--model", "tiny", "--tasks", task]), "lm-eval cannot load them")
    assert task in err and "bundled offline tasks: " in err


# ------------------------------------------------------------------------------------------- eval labels
def test_eval_labels_a_folder_without_its_record_from_its_quantization_config(tmp_path):
    folder = tmp_path / "c"
    assert cli.main(["compress", "--model", "tiny", "--nm", "6:8", "--nsamples", "0", "--out", str(folder)]) == 0
    meta = json.loads((folder / "pbs2p_compress.json").read_text())
    (folder / "pbs2p_compress.json").unlink()  # e.g. a folder written by save_pretrained, or copied without it
    out = tmp_path / "e.json"
    assert cli.main(["eval", "--model", str(folder), "--seqlen", "16", "--ppl-limit", "1", "--out", str(out),
                     "--no-progress"]) == 0
    (entry,) = json.loads(out.read_text())["entries"]
    assert entry["label"] == "pbs2p 6:8 (quantization_config)" and entry["method"] == "pbs2p"
    assert entry["nm"] == "6:8" and entry["config"]["n"] == 6
    assert entry["bits_per_weight"] == pytest.approx(meta["bits_per_weight"])
    assert entry["bits_per_weight_kept"] == pytest.approx(0.75)
