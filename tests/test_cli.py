"""The relu-regions command: demo, analyze (state_dict + class, torch.export program, npz/csv), clear errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from relu_regions import cli
from relu_regions.models import SmallCNN, mlp


def run(argv, capsys):
    code = cli.main(list(argv) + ["--no-progress"] if argv and argv[0] in ("demo", "analyze", "compare") else argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]


@pytest.fixture()
def tabular_files(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 4, generator=g)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    model = mlp(4, [6, 5], 3)
    sd = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), sd)
    npz = tmp_path / "data.npz"
    np.savez(npz, X=X.numpy(), y=y.numpy())
    csv = tmp_path / "data.csv"
    rows = np.concatenate([X.numpy(), y.numpy()[:, None]], 1)
    np.savetxt(csv, rows, delimiter=",", header="a,b,c,d,label", comments="", fmt="%.6g")
    (tmp_path / "netdefs.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        from relu_regions.models import mlp

        def make(n_in=4):
            return mlp(n_in, [6, 5], 3)

        class WithSigmoid(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Linear(4, 6)
                self.b = nn.Linear(6, 3)

            def forward(self, x):
                return self.b(self.a(x).sigmoid())
    """))
    return tmp_path, model, X, y, sd, npz, csv


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("demo", "analyze", "compare", "examples:"):
        assert word in out
    with pytest.raises(SystemExit):
        cli.main(["analyze", "--help"])
    out = capsys.readouterr().out
    assert "--model" in out and "--class" in out and "weights_only=True" in out


@pytest.mark.parametrize("module", ["relu_regions.cli", "relu_regions"])  # (the package had no __main__)
def test_module_is_runnable(module):
    res = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("relu-regions ")


def test_demo_quick_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo_report"
    code, stdout, err = run(["demo", "--quick", "--out", str(out), "--seed", "3"], capsys)
    assert code == 0, err
    assert (out / "index.html").is_file() and (out / "summary.md").is_file()
    assert list((out / "figures").glob("*.png"))
    md = (out / "summary.md").read_text()
    assert "SmallCNN" in md and "## Activation regions" in md
    # the printed accuracy is the one in the summary
    acc = stdout.split("accuracy ", 1)[1].split()[0]
    assert f"{float(acc):.4f}" in md


def test_analyze_state_dict_with_class_and_npz(tabular_files, capsys, monkeypatch):
    tmp, model, X, y, sd, npz, _ = tabular_files
    monkeypatch.chdir(tmp)
    out = tmp / "rep"
    code, stdout, err = run(["analyze", "--model", str(sd), "--class", "netdefs:make", "--data", str(npz),
                             "--out", str(out), "--quick"], capsys)
    assert code == 0, err
    with torch.no_grad():
        acc = float((model(X).argmax(1) == y).double().mean())
    assert f"accuracy {acc:.4f}" in stdout
    assert (out / "index.html").is_file()


def test_analyze_exported_program_and_csv(tabular_files, capsys):
    tmp, model, X, y, _, _, csv = tabular_files
    ep = torch.export.export(model.eval(), (X[:3],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp / "mlp.pt2"
    torch.export.save(ep, path)
    loaded = cli.load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), model(X))
    out = tmp / "rep2"
    code, stdout, err = run(["analyze", "--model", str(path), "--data", str(csv), "--out", str(out), "--quick"],
                            capsys)
    assert code == 0, err
    md = (out / "summary.md").read_text()
    assert "| a |" in md or "a" in md  # feature names from the CSV header label the bars table
    # regions of the rewritten program equal those of the original model
    import relu_regions as rr

    with rr.record(loaded.model) as r1:
        loaded.model(X)
    with rr.record(model) as r2:
        model(X)
    assert len(torch.unique(r1.packed(), dim=0)) == len(torch.unique(r2.packed(), dim=0))
    assert len(r1.layer_names) == 2
    # before: --class with a .pt2 program failed in torch.load's pickle check ("not a plain state_dict")
    code, _, err = run(["analyze", "--model", str(path), "--class", "relu_regions.models:SmallCNN", "--data",
                        str(csv), "--out", str(tmp / "rep3")], capsys)
    assert_one_line_error(code, err, "is a torch.export program", "leave out --class relu_regions.models:SmallCNN")
    assert not (tmp / "rep3").exists()
    # --logits-at names a module that export inlined (kept as a holder of parameters, never called): the run failed
    # asking for the --logits-at it had been given
    code, _, err = run(["analyze", "--model", str(path), "--logits-at", "2", "--data", str(csv), "--out",
                        str(tmp / "rep4")], capsys)
    assert_one_line_error(code, err, "--logits-at: a torch.export program has no module calls")


def test_compare_refuses_logits_at(tabular_files, capsys):
    """Before: compare accepted --logits-at and ignored it (it explained the model's output, e.g. softmax
    probabilities); the Captum peers and Re3 explain that output, so it must be the logits."""
    tmp, _, _, _, sd, npz, _ = tabular_files
    code, _, err = run(["compare", "--model", str(sd), "--class", "netdefs:make", "--data", str(npz),
                        "--logits-at", "2", "--quick"], capsys)
    assert_one_line_error(code, err, "--logits-at", "must be the logits")


def test_compare_refuses_data_options_without_a_model(tabular_files, capsys):
    """Before: compare --data FILE without --model ran the demo network on the digits and exited 0, the data (and
    --limit, --class, ...) ignored."""
    _, _, _, _, _, npz, _ = tabular_files
    for extra in (["--data", str(npz)], ["--limit", "5"], ["--class", "netdefs:make"], ["--split", "train"]):
        code, _, err = run(["compare", "--quick", *extra], capsys)
        assert_one_line_error(code, err, extra[0], "need --model")


def test_errors_are_one_line_and_write_nothing(tabular_files, capsys, monkeypatch):
    tmp, model, X, y, sd, npz, csv = tabular_files
    monkeypatch.chdir(tmp)
    out = tmp / "never"

    def check(argv, *needles):
        code, _, err = run(argv + ["--out", str(out)], capsys)
        assert_one_line_error(code, err, *needles)
        assert not out.exists()

    check(["analyze", "--model", "nope.pt", "--class", "netdefs:make", "--data", str(npz)], "no such file")
    check(["analyze", "--model", str(sd), "--class", "netdefs:make", "--data", "nope.npz"], "no such file")
    check(["analyze", "--model", str(sd), "--data", str(npz)], "--class")
    check(["analyze", "--model", str(sd), "--class", "netdefs", "--data", str(npz)], "module:Class")
    check(["analyze", "--model", str(sd), "--class", "nomod:X", "--data", str(npz)], "cannot import")
    check(["analyze", "--model", str(sd), "--class", "netdefs:make", "--class-kwargs", '{"n_in": 5}',
           "--data", str(npz)], "does not fit")
    # a whole pickled model is refused (weights_only), with what to do instead
    whole = tmp / "whole.pt"
    torch.save(model, whole)
    check(["analyze", "--model", str(whole), "--class", "netdefs:make", "--data", str(npz)],
          "refusing", "state_dict")
    # TorchScript cannot be observed
    ts = tmp / "ts.pt"
    torch.jit.save(torch.jit.script(model), ts)
    check(["analyze", "--model", str(ts), "--data", str(npz)], "TorchScript")
    check(["analyze", "--model", str(ts), "--class", "netdefs:make", "--data", str(npz)], "TorchScript")
    # unsupported layer: names the module and the operation
    monkeypatch.syspath_prepend(str(tmp))
    import netdefs

    torch.save(netdefs.WithSigmoid().state_dict(), tmp / "sig.pt")
    check(["analyze", "--model", str(tmp / "sig.pt"), "--class", "netdefs:WithSigmoid", "--data", str(npz)],
          "sigmoid")
    # data whose shape does not fit the model
    np.savez(tmp / "img.npz", X=np.zeros((5, 1, 8, 8), np.float32), y=np.zeros(5, np.int64))
    check(["analyze", "--model", str(sd), "--class", "netdefs:make", "--data", str(tmp / "img.npz")],
          "does not fit the model")
    check(["analyze", "--model", str(sd), "--class", "netdefs:make", "--data", str(npz), "--input-shape", "3,3"],
          "--input-shape")
    np.savez(tmp / "bad.npz", A=np.zeros(3))
    check(["analyze", "--model", str(sd), "--class", "netdefs:make", "--data", str(tmp / "bad.npz")], "'X' and 'y'")
    (tmp / "data.txt").write_text("1,2\n")
    check(["analyze", "--model", str(sd), "--class", "netdefs:make", "--data", str(tmp / "data.txt")],
          "unsupported file type")
    # labels beyond the model's outputs
    np.savez(tmp / "lab.npz", X=X.numpy(), y=np.full(len(X), 7))
    check(["analyze", "--model", str(sd), "--class", "netdefs:make", "--data", str(tmp / "lab.npz")], "labels")
    # an --out that is someone else's directory is not touched
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("keep")
    code, _, err = run(["analyze", "--model", str(sd), "--class", "netdefs:make", "--data", str(npz), "--out",
                        str(foreign), "--quick"], capsys)
    assert_one_line_error(code, err, "not a relu-regions report")
    assert [p.name for p in foreign.iterdir()] == ["x.txt"]


def test_bad_arguments_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["analyze", "--data", "mnist"])  # --model missing
    assert e.value.code == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2


def test_lightning_style_checkpoint_with_prefix(tmp_path):
    model = SmallCNN()
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}
    path = tmp_path / "l.ckpt"
    torch.save(ckpt, path)
    loaded = cli.load_model(path, "relu_regions.models:SmallCNN")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)


def test_pytorch_general_checkpoint(tmp_path):
    # PyTorch's tutorial "saving and loading a general checkpoint": the weights under model_state_dict (was refused:
    # "expected a state_dict (a dict of tensors); got dict")
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "general.pt"
    torch.save({"epoch": 2, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "loss": 0.5}, path)
    loaded = cli.load_model(path, "relu_regions.models:SmallCNN")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    torch.save({"epoch": 2, "weights": model.state_dict()}, path)  # an unknown key: named in the message
    with pytest.raises(cli.CLIError, match=r"entries \['epoch', 'weights'\] are not tensors.*'weights'.*dicts"):
        cli.load_model(path, "relu_regions.models:SmallCNN")


def test_image_folder(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    data = cli.load_data(str(tmp_path / "imgs"))
    assert data.X.shape == (6, 1, 8, 8) and data.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.class_names == ["cat", "dog"]
    with Image.open(tmp_path / "imgs" / "dog" / "2.png") as im:
        assert np.allclose(data.X[5, 0].numpy(), np.asarray(im) / 255.0)


def test_compare_command(capsys, tmp_path):
    pytest.importorskip("captum")
    pytest.importorskip("relu_regions.compare")
    out = tmp_path / "cmp.md"
    code, stdout, err = run(["compare", "--quick", "--methods", "ixg,ig", "--samples", "6", "--out", str(out)],
                            capsys)
    assert code == 0, err
    table = out.read_text()
    assert "| Re3 |" in table and "| InputXGradient |" in table and "| IntegratedGradients |" in table
    # the Monte-Carlo infidelity and the timings are labelled as such (before: plain headers, as if exact)
    assert "| infidelity (MC estimate) |" in table and "Not exact: times are wall-clock" in table
    code, _, err = run(["compare", "--quick", "--methods", "nonsense"], capsys)
    assert_one_line_error(code, err, "unknown method")


def test_numeric_headers_counts_and_compare_out(tabular_files, capsys):
    """Before: pandas' header of unnamed columns ("0,1,2,3,4") was read as a sample (21 rows for 20); --samples 0
    and negative --explain / --samples ran (an IndexError, or a count from the end); compare --out naming a
    directory failed with an IsADirectoryError after the whole comparison, leaving a temporary file beside it."""
    from relu_regions.cli import load_data

    tmp, model, X, y, sd, npz, csv = tabular_files
    plain = tmp / "plain.csv"
    rows = np.concatenate([X.numpy(), y.numpy()[:, None]], 1)
    np.savetxt(plain, rows, delimiter=",", header="0,1,2,3,4", comments="", fmt="%.6g")
    data = load_data(str(plain))
    assert len(data.y) == len(X) and torch.equal(data.y, y)
    for argv in (["compare", "--quick", "--samples", "0"], ["compare", "--quick", "--samples", "-1"],
                 ["analyze", "--model", str(sd), "--class", "netdefs:make", "--data", str(npz), "--explain", "-5"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert "must be a positive integer" in capsys.readouterr().err
    folder = tmp / "cmpdir"
    folder.mkdir()
    code, _, err = run(["compare", "--quick", "--out", str(folder)], capsys)
    assert_one_line_error(code, err, "is a directory")
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".cmpdir")) == []


def test_state_dict_or_torchscript_without_class_is_one_line(tabular_files, capsys):
    """Before: torch.export.load was tried on every zip file first and logged its warning and traceback (~20 lines
    on stderr) before the one-line error; an exported program saved under another suffix than .pt2 logged a
    warning too."""
    import logging

    tmp, model, X, y, sd, npz, _ = tabular_files
    ts = tmp / "ts.pt"
    torch.jit.save(torch.jit.script(model), ts)
    ep = torch.export.export(model.eval(), (X[:3],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    other = tmp / "program.pt"
    torch.export.save(ep, other)
    # torch's handler writes to the stderr of import time, which capsys does not see: listen beside it
    records: list[logging.LogRecord] = []
    listener = logging.Handler()
    listener.emit = records.append
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch.export.pt2_archive._package")]
    loggers[0].addHandler(listener)
    setup = [(lg.level, list(lg.handlers), lg.propagate) for lg in loggers]
    try:
        for path, needle in ((sd, "holds a state_dict"), (ts, "TorchScript")):
            code = cli.main(["analyze", "--model", str(path), "--data", str(npz), "--out", str(tmp / "never")])
            assert_one_line_error(code, capsys.readouterr().err, needle)
        loaded = cli.load_model(other)
        assert [(lg.level, list(lg.handlers), lg.propagate) for lg in loggers] == setup  # put back
    finally:
        loggers[0].removeHandler(listener)
    assert [r.getMessage()[:80] for r in records] == []
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), model(X))


def test_exported_program_names_a_sample_shape_mismatch(tmp_path, capsys):
    """Before: any shape-guard failure of a .pt2 was put down to the batch dimension ("export with a dynamic batch
    dimension") although the program had one; the samples' shape was the problem."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()  # takes (N, 1, 4, 4)
    ep = torch.export.export(net, (torch.rand(3, 1, 4, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "net.pt2"
    torch.export.save(ep, path)
    for features, needles in ((16, ["shape (16,) (16 values)", "takes samples of shape (1, 4, 4) (16 values)",
                                    "--input-shape 1,4,4"]),
                              (9, ["shape (9,) (9 values)", "(16 values)", "does not fit this model"])):
        np.savez(tmp_path / "d.npz", X=np.random.rand(5, features).astype(np.float32), y=np.zeros(5, np.int64))
        code, _, err = run(["analyze", "--model", str(path), "--data", str(tmp_path / "d.npz"), "--out",
                            str(tmp_path / "never")], capsys)
        assert_one_line_error(code, err, *needles)
        assert "dynamic batch" not in err
    assert not (tmp_path / "never").exists()


def test_demo_help_shows_a_plain_percent_sign(capsys):
    """Before: ``demo --help`` printed "the held-out 20%%" (argparse %-formats help strings, not descriptions)."""
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "analyse the held-out 20% and write" in out and "%%" not in out


def test_data_a_user_meets_is_read_right_or_refused_by_name(tabular_files, capsys):
    """Found by QA: a NaN cell was counted as a region and a prediction (report "exact": 59 regions where the finite
    rows have 58); a UTF-8 byte-order mark (Excel's "CSV UTF-8") hid the header or dropped the first row; 16-bit
    PNGs were clipped to 0/1 by convert("L"); a hidden ".ipynb_checkpoints" folder became class 0; damaged files
    gave errors naming no file (exit 1); a non-PyTorch --model with --class gave torch's "KeyError: 101"; the
    report directory was mode 0700 whatever the umask."""
    import os
    import stat

    from PIL import Image

    tmp, model, X, y, sd, npz, csv = tabular_files
    net = ["--class", "relu_regions.models:mlp", "--class-kwargs", '{"n_in": 4, "hidden": [6, 5], "n_out": 3}']
    rows = np.concatenate([X.numpy(), y.numpy()[:, None]], 1)
    nan = rows.copy()
    nan[5, 2] = np.nan
    bad = tmp / "nan.csv"
    np.savetxt(bad, nan, delimiter=",", fmt="%.6g")
    code, _, err = run(["analyze", "--model", str(sd), *net, "--data", str(bad), "--out", str(tmp / "r1")], capsys)
    assert_one_line_error(code, err, "1 sample(s) hold NaN or infinite values (first: row 5)")
    assert not (tmp / "r1").exists()
    # byte-order mark, with and without a header: every row, the header's names
    text = csv.read_text()
    (tmp / "bom.csv").write_text("\ufeff" + text, encoding="utf-8")
    body = "\n".join(text.splitlines()[1:]) + "\n"
    (tmp / "bom_plain.csv").write_text("\ufeff" + body, encoding="utf-8")
    with_header, plain = cli.load_data(str(tmp / "bom.csv")), cli.load_data(str(tmp / "bom_plain.csv"))
    assert with_header.feature_names == ["a", "b", "c", "d"] and len(with_header.y) == len(plain.y) == 60
    assert torch.allclose(plain.X, torch.as_tensor(rows[:, :4], dtype=torch.float32), atol=1e-5)
    # 16-bit PNGs keep their levels; hidden folders are no class
    rng = np.random.default_rng(0)
    for c in ("a", "b", ".ipynb_checkpoints"):
        (tmp / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 65535, (4, 4), dtype=np.uint16)).save(tmp / "imgs" / c / f"{i}.png")
    data = cli.load_data(str(tmp / "imgs"))
    assert data.class_names == ["a", "b"] and data.y.tolist() == [0, 0, 1, 1]
    with Image.open(tmp / "imgs" / "b" / "1.png") as im:
        assert np.allclose(data.X[3, 0].numpy(), np.asarray(im, dtype=np.float64) / 65535.0, atol=1e-6)
    # damaged files: one line naming the file, exit 2
    (tmp / "notzip.npz").write_text("X,y\n1,2\n")
    np.save(tmp / "single.npy", np.zeros((3, 2)))
    os.replace(tmp / "single.npy", tmp / "single.npz")
    (tmp / "imgs" / "a" / "broken.png").write_bytes(b"not a png")
    for path, needle in ((tmp / "notzip.npz", "not a readable .npz archive"),
                         (tmp / "single.npz", "a single array, not an .npz archive"),
                         (tmp / "imgs", "cannot read image")):
        code, _, err = run(["analyze", "--model", str(sd), *net, "--data", str(path), "--out", str(tmp / "r2")],
                           capsys)
        assert_one_line_error(code, err, str(path), needle)
    code, _, err = run(["analyze", "--model", str(csv), *net, "--data", str(npz), "--out", str(tmp / "r3")], capsys)
    assert_one_line_error(code, err, "not a PyTorch file")
    # the report directory follows the umask
    code, _, err = run(["analyze", "--model", str(sd), *net, "--data", str(npz), "--out", str(tmp / "r4"), "--quick"],
                       capsys)
    assert code == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp / "r4").stat().st_mode) == 0o777 & ~umask


def test_out_and_method_names_are_checked_before_any_training(tmp_path, capsys, monkeypatch):
    """A bad --out (its parent missing, or a file that is no report directory) and an unknown --methods name were
    reported only after the demo network had been trained and the analysis run."""
    def no_training(*a, **k):
        raise AssertionError("trained before the arguments were checked")

    monkeypatch.setattr(cli, "train_demo_model", no_training)
    (tmp_path / "afile").write_text("x")
    code, _, err = run(["demo", "--out", str(tmp_path / "afile" / "r")], capsys)
    assert_one_line_error(code, err, "parent directory of --out does not exist")
    code, _, err = run(["demo", "--out", str(tmp_path / "afile")], capsys)
    assert_one_line_error(code, err, "exists and is not a directory")
    code, _, err = run(["compare", "--methods", "bogus"], capsys)
    assert_one_line_error(code, err, "unknown method 'bogus'")
    code, _, err = run(["compare", "--out", str(tmp_path / "nodir" / "t.md")], capsys)
    assert_one_line_error(code, err, "parent directory does not exist")
