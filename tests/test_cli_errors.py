"""Every bad input to a psnrl subcommand ends in one clear line on stderr and a non-zero exit:
missing and unreadable files, wrong types and out-of-range values, never a traceback."""
import pytest

from psnrl.trainer.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from psnrl.trainer.tiny import build_checkpoint

    root = tmp_path_factory.mktemp("cli")
    (root / "bad.yaml").write_text("train:\n  iterations: [1\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    (root / "bad.jsonl").write_text('{"prompt": "1+1="}\nnot json\n')
    (root / "noprompt.jsonl").write_text('{"text": "1+1="}\n')
    (root / "notjson.json").write_text("{")
    return {"root": root, "model": build_checkpoint(root / "tiny")}


def cases(root, model):
    missing = root / "missing"
    train = [
        (["--config", str(missing / "c.yaml")], "c.yaml"),
        (["--config", str(root / "bad.yaml")], "bad.yaml"),
        (["--config", str(root / "list.yaml")], "list.yaml"),
        (["--config", str(root / "binary.yaml")], "binary.yaml"),
        (["--config", str(root)], str(root)),
        (["train.iterations=abc"], "train.iterations"),
        (["train.iterations=-3"], "train.iterations"),
        (["noise.sigma=-1"], "sigma"),
        (["rollout.group_size=0"], "group_size"),
        (["rollout.grop_size=4"], "rollout.grop_size"),
        (["nosection"], "nosection"),
        ([f"model.path={missing}"], "missing"),
        ([f"data.train={missing / 'train.jsonl'}"], "train.jsonl"),
        (["--resume"], "checkpoint"),
    ]
    evaluate = [
        ([str(missing)], "missing"),
        ([str(model), "--n", "0"], "n"),
        ([str(model), "--n", "x"], "--n"),
        ([str(model), "--sets", "nope"], "nope"),
        ([str(model), "--limit", "-1"], "--limit"),
        ([str(model), "--ks", "3", "--n", "2"], "every k"),
        ([str(model), "--temperature", "-1"], "temperature"),
        ([str(model), "--sets", "tiny-arith", "--compare", str(missing / "c.json")], "c.json"),
        ([str(model), "--sets", "tiny-arith", "--compare", str(root / "notjson.json")], "notjson.json"),
        ([str(model), "--embedder", "bogus"], "--embedder"),
        ([str(model), "--dtype", "float7"], "float7"),
    ]
    generate = [
        ([str(model), "--prompts-file", str(missing / "p.jsonl")], "p.jsonl"),
        ([str(model), "--prompts-file", str(root)], str(root)),
        ([str(model), "--prompts-file", str(root / "bad.jsonl")], "bad.jsonl:2"),
        ([str(model), "--prompts-file", str(root / "noprompt.jsonl")], "noprompt.jsonl:1"),
        ([str(model), "--prompt", "1+1=", "--sigma", "-1"], "--sigma"),
        ([str(model), "--prompt", "1+1=", "--sigma", "nan"], "--sigma"),
        ([str(model), "--prompt", "1+1=", "--n", "0"], "n"),
        ([str(model), "--prompt", "1+1=", "--max-tokens", "0"], "max_tokens"),
        ([str(model), "--prompt", "1+1=", "--top-p", "2"], "top_p"),
        ([str(model), "--prompt", "1+1=", "--sigma", "0.01", "--targets", "bogus"], "bogus"),
        ([str(model), "--prompt", "1+1=", "--block-size", "0"], "block"),
        ([str(model), "--prompt", "hi"], "hi"),
        ([str(missing), "--prompt", "1+1="], "missing"),
    ]
    export = [
        ([str(missing), str(root / "out")], "missing"),
        ([str(model), str(root / "out")], "run folder"),
    ]
    bench = [
        (["nope"], "nope"),
        (["noisy-gemm", "--bogus"], "--bogus"),
        (["decode", "--batches", "x"], "--batches"),
        (["host", "--batches", "-1"], "--batches"),
    ]
    for command, group in (("train", train), ("eval", evaluate), ("generate", generate), ("export", export),
                           ("bench", bench)):
        for argv, needle in group:
            yield command, argv, needle


def test_bad_input_gives_one_line_and_a_nonzero_exit(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.chdir(tmp_path)  # the default run folder (runs/tiny) lands here, and must stay empty
    failures = []
    for command, argv, needle in cases(files["root"], files["model"]):
        try:
            code = main([command, *argv])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        out = capsys.readouterr()
        lines = [line for line in out.err.splitlines() if line.strip() and not line.startswith("usage:")
                 and not line.startswith(" ")]  # argparse's usage block is allowed above its one line
        if not (code not in (0, None) and len(lines) == 1 and needle in lines[0] and "Traceback" not in out.err):
            failures.append(f"{command} {' '.join(argv)} -> exit {code}, stderr {out.err!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "runs").exists()  # a refused start writes nothing
