"""RegionMonitor: statistics equal to an independent evaluation, state safety, checkpoints, DDP equality.

The DDP run (2 CPU processes, gloo, ``ddp_spawn``) happens in a subprocess running this file as a script, so a hang
cannot block the suite (the subprocess has a timeout).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

from relu_regions.integrations.lightning import RegionMonitor  # noqa: E402
from relu_regions.models import mlp  # noqa: E402
from relu_regions.training import boundary_distances, evaluate  # noqa: E402


class _FunctionalReLU(torch.nn.Module):
    """A user-written activation module (F.relu inside): recorded through the function mode, not the hooks."""

    def forward(self, x):
        return F.relu(x)


class Lit(pl.LightningModule):
    def __init__(self, lr: float = 0.1, direct: bool = False, dict_batches: bool = False,
                 functional: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp(2, [6, 5], 3, activation=_FunctionalReLU if functional else torch.nn.ReLU)
        self.lr, self.direct, self.dict_batches = lr, direct, dict_batches

    def forward(self, x):
        return self.net(x)

    def _xy(self, batch):
        return (batch["inputs"], batch["label"]) if self.dict_batches else batch

    def training_step(self, batch, i):
        x, y = self._xy(batch)
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, i):
        x, y = self._xy(batch)
        out = self.net(x) if self.direct else self(x)
        self.log("val_loss", F.cross_entropy(out, y))
        # (under DDP, Lightning runs this step as the module's forward: these are not the model's operations)
        self.log("val_acc", (out.softmax(1).argmax(1) == y).float().mean())

    def test_step(self, batch, i):
        x, y = self._xy(batch)
        if getattr(self, "fail", False):
            self(x)
            raise RuntimeError("user step failed")
        self.log("test_loss", F.cross_entropy(self.net(x) if self.direct else self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return torch.utils.data.TensorDataset(x, y)


def loader(ds, bs=16):
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False)


def trainer(callbacks=(), tmp=None, **kw):
    opts = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=1)
    opts.update(kw)
    if tmp is not None:
        opts["default_root_dir"] = str(tmp)
    return pl.Trainer(callbacks=list(callbacks), **opts)


def _hooks(m):
    """Hooks per module, and whether a forward is set on the instance (the hook route's patches)."""
    return [(len(x._forward_hooks), len(x._forward_pre_hooks), "forward" in x.__dict__) for x in m.modules()]


@pytest.mark.parametrize("functional", [False, True], ids=["hook-route", "function-mode"])
def test_monitor_matches_independent_evaluation_and_leaves_model_unchanged(functional):
    from relu_regions.hook_recording import HookPlan, hook_plan

    train, val = make_data(64, 0), make_data(48, 1)
    mon = RegionMonitor(train_every_n_batches=1, probe_size=20, granularities={"last": -1})
    model = Lit(functional=functional)
    assert isinstance(hook_plan(model), HookPlan) != functional
    hooks = _hooks(model)
    trainer([mon]).fit(model, loader(train), loader(val))
    # same training without the callback: identical weights (the callback changes nothing)
    ref = Lit(functional=functional)
    trainer().fit(ref, loader(train), loader(val))
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    assert _hooks(model) == hooks
    # the last validation ran with the final weights: compare with evaluate() on the same data
    ev = evaluate(model.net, loader(val), n_classes=3, granularities={"last": -1})
    st = mon.stats["val"]
    assert st.n_regions() == ev.n_regions() and st.n_regions("last") == ev.n_regions("last")
    assert st.n_samples == 48 and st.accuracy == ev.accuracy
    assert st.coverage(1) == ev.coverage(1) and st.mean_purity() == ev.mean_purity()
    tr = evaluate(model.net, loader(train), n_classes=3)  # train stats: eval-mode passes over the training batches
    assert mon.stats["train"].n_regions() == tr.n_regions()
    rows = [h for h in mon.history if h["stage"] == "val"]
    assert [h["epoch"] for h in rows] == [0, 1]  # the sanity check is not recorded
    last = rows[-1]
    assert last["n_regions"] == ev.n_regions()
    assert last["topC_coverage"] == ev.coverage(3)
    assert last["confusion_share"] == ev.confusion_share()
    assert last["train_overlap"] == pytest.approx(tr.overlap(ev))
    probe = val.tensors[0][:20]
    assert torch.equal(mon.probe, probe)
    assert last["boundary_distance_median"] == pytest.approx(float(boundary_distances(model.net, probe).median()))
    # logged through pl_module.log (float32)
    t = trainer([mon])
    t.test(model, loader(val))
    assert t.callback_metrics["regions/test/n_regions"].item() == ev.n_regions()
    assert t.callback_metrics["regions/test/mean_purity"].item() == pytest.approx(ev.mean_purity())
    assert _hooks(model) == hooks
    import matplotlib

    matplotlib.use("Agg")
    ax = mon.plot_history()
    assert [list(line.get_ydata()) for line in ax.get_lines()][0] == [h["n_regions"] for h in rows]


def _table(stats, name):
    t = stats.tables[name]
    return {int(k): (int(c), t.true[r].tolist(), t.pred[r].tolist()) for r, (k, c) in enumerate(zip(t.keys, t.count))}


@pytest.mark.parametrize("budget", ["batches", "bytes"])
def test_keys_computed_a_few_batches_later_count_every_batch_once(monkeypatch, budget):
    """The monitor can compute the keys of recorded batches a few at a time (every _KEY_EVERY batches, set to 4
    here, or as soon as their states pass _KEY_BYTES) and the rest at epoch end: every batch counts once, in the
    region of its own pattern. 11 batches -> groups of 4, 4 and 3 (or 11 of 1); per region the counts and class
    histograms, the unit counts and the accuracy equal an independent evaluation, for two granularities."""
    import relu_regions.integrations.lightning as L

    monkeypatch.setattr(L, "_KEY_EVERY", 4)
    if budget == "bytes":
        monkeypatch.setattr(L, "_KEY_BYTES", 1)
    groups = []
    key = L.RegionMonitor._key

    def spy(self, slot):
        groups.append(len(self._waiting.get(slot, [])))
        key(self, slot)

    monkeypatch.setattr(L.RegionMonitor, "_key", spy)
    val = make_data(85, 1)  # batches of 8: ten full ones and one of 5
    model = Lit()
    mon = RegionMonitor(probe_size=0, granularities={"last": -1})
    trainer([mon]).validate(model, loader(val, bs=8), verbose=False)
    assert groups == ([4, 4, 3] if budget == "batches" else [1] * 11)
    ev = evaluate(model.net, loader(val, bs=8), n_classes=3, granularities={"last": -1})
    st = mon.stats["val"]
    assert st.n_samples == 85 and st.accuracy == ev.accuracy
    for name in ("full", "last"):
        assert _table(st, name) == _table(ev, name)
    assert list(st.unit_active) == ["net.1", "net.3"] and list(ev.unit_active) == ["1", "3"]  # the module recorded
    for k in ("1", "3"):
        assert st.unit_samples["net." + k] == ev.unit_samples[k] == 85
        assert torch.equal(st.unit_active["net." + k], ev.unit_active[k])


class _Patched(pl.Callback):
    """Notes whether the monitored ReLU's forward is patched at each validation batch end (after the monitor's
    hook), and runs the model on 3 other inputs there: a pass outside any step."""

    def __init__(self):
        self.patched = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.patched.append("forward" in pl_module.net[1].__dict__)
        pl_module(torch.randn(3, 2))


@pytest.mark.parametrize("functional", [False, True], ids=["hook-route", "function-mode"])
def test_recording_spans_the_epoch_on_the_hook_route_and_passes_between_batches_are_not_counted(functional):
    """The hook route's forward patches stay on from the first recorded batch to the epoch's end (the function mode
    only within each batch); a model call between batches (another callback's) lands in the next batch's recording,
    which keeps only the step's pass: the statistics equal an independent evaluation, and the model ends unpatched."""
    val = make_data(48, 1)
    model = Lit(functional=functional)
    hooks = _hooks(model)
    mon, spy = RegionMonitor(3, probe_size=0), _Patched()
    trainer([mon, spy]).validate(model, loader(val), verbose=False)
    assert spy.patched == [not functional] * 3
    assert _hooks(model) == hooks
    ev = evaluate(model.net, loader(val), n_classes=3)
    st = mon.stats["val"]
    assert st.n_samples == 48 and _table(st, "full") == _table(ev, "full")


class LazyFeatures(Lit):
    """A step that registers a feature hook once, on its first validation batch, and relies on it afterwards."""

    def __init__(self):
        super().__init__()
        self.features: list[torch.Tensor] = []
        self.feature_hook = None

    def validation_step(self, batch, i):
        if self.feature_hook is None:
            self.feature_hook = self.net[1].register_forward_hook(lambda m, a, o: self.features.append(o))
        return super().validation_step(batch, i)


def test_what_the_step_changes_during_a_recorded_batch_stays():
    """The monitor's per-batch recording removes exactly its own hooks: a hook the user's step registers while a batch
    is recorded keeps working on the later batches (the old wholesale restore dropped it after the first)."""
    val = make_data(48, 1)
    model = LazyFeatures()
    trainer([RegionMonitor(3, probe_size=0)], num_sanity_val_steps=0).validate(model, loader(val), verbose=False)
    assert [f.shape[0] for f in model.features] == [16, 16, 16]
    assert len(model.net[1]._forward_hooks) == 1 and all(len(m._forward_hooks) == 0 for m in model.net if
                                                          m is not model.net[1])
    model.feature_hook.remove()


def test_probe_distance_with_a_layer_selection_is_the_minimum_over_those_layers():
    from relu_regions.geometry import boundary_distance

    val = make_data(48, 1)
    model = Lit()
    mon = RegionMonitor(layers=["net.1"], probe_size=20)
    trainer([mon]).validate(model, loader(val), verbose=False)
    probe = val.tensors[0][:20]
    full = boundary_distance(model.net, probe)  # every layer; the selection is one of its per-layer minima
    assert full.layer_names == ["1", "3"]
    sel = full.per_layer["1"]
    assert not torch.equal(sel, full.distance)  # the selection matters for this probe
    assert mon.history[-1]["boundary_distance_median"] == pytest.approx(float(sel[torch.isfinite(sel)].median()))


class LitCNN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                       torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, 6), torch.nn.ReLU(),
                                       torch.nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def test_probe_distance_on_images_with_ties_equals_the_full_computation(monkeypatch):
    """Images with flat bands sit on a boundary (max-pool ties); the others need the full computation: the logged
    median is the one of every probe image's exact distance."""
    import relu_regions.geometry as G

    g = torch.Generator().manual_seed(2)
    x = torch.rand(12, 1, 12, 12, generator=g)
    x[:5, :, :6] = 0.0  # 5 of 12 images have a flat band: the median (lower middle) is a computed distance
    val = torch.utils.data.TensorDataset(x, torch.randint(0, 3, (12,), generator=g))
    model = LitCNN()
    computed = []
    real = G._fast_chunk
    monkeypatch.setattr(G, "_fast_chunk", lambda *a: computed.append(a[2].shape[0]) or real(*a))
    mon = RegionMonitor(probe_size=12)
    trainer([mon]).validate(model, loader(val), verbose=False)
    d = G.boundary_distance(model.net, x).distance  # every layer, every image, in full
    assert (d[:5] == 0).all() and (d[5:] > 0).all()
    assert computed == [7, 12]  # the monitor computed only the images without a proof, then the full call above
    assert float(d.median()) == float(d[5:].min()) > 0
    assert mon.history[-1]["boundary_distance_median"] == pytest.approx(float(d.median()), rel=1e-6)


def test_labels_from_dict_batches_user_function_and_clear_errors():
    ds = make_data(32)
    dict_loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=lambda it: {
        "inputs": torch.stack([i[0] for i in it]), "label": torch.stack([i[1] for i in it])})
    model = Lit(dict_batches=True)
    hooks = _hooks(model)
    mon = RegionMonitor(3, probe_size=0)  # "label" is one of the default keys
    trainer([mon]).test(model, dict_loader)
    ref = evaluate(model.net, loader(ds), n_classes=3)
    assert mon.stats["test"].n_regions() == ref.n_regions()
    mon2 = RegionMonitor(3, get_labels=lambda b: b["label"], probe_size=0)
    trainer([mon2]).test(model, dict_loader)
    assert mon2.stats["test"].n_regions() == ref.n_regions()
    with pytest.raises(KeyError, match="label_key='cls'"):
        trainer([RegionMonitor(3, label_key="cls")]).test(model, dict_loader)
    assert _hooks(model) == hooks  # hooks removed after the exception
    # a step that calls self.net directly: clear error naming the fix
    with pytest.raises(RuntimeError, match="module='net'"):
        trainer([RegionMonitor(3)]).test(Lit(direct=True), loader(ds))
    mon3 = RegionMonitor(3, module="net", probe_size=0)
    trainer([mon3]).test(Lit(direct=True), loader(ds))
    assert mon3.stats["test"].n_regions() == ref.n_regions()
    with pytest.raises(ValueError, match="stages"):
        RegionMonitor(stages=["fit"])
    # every option is checked when the callback is made (before: a negative probe_size turned the probe off without a
    # word, a purity threshold of 1.5 failed at the first recorded batch, a probe list at the first attribute read)
    for kw, msg in [({"probe_size": -1}, "probe_size must be an int >= 0, got -1"),
                    ({"probe_size": 1.5}, "probe_size must be an int >= 0"),
                    ({"every_n_epochs": 0}, "every_n_epochs must be an int >= 1"),
                    ({"train_every_n_batches": 0}, "train_every_n_batches must be None or an int >= 1"),
                    ({"top": 0}, "top must be None or an int >= 1"),
                    ({"compare_every_n_epochs": 0}, "compare_every_n_epochs must be None or an int >= 1"),
                    ({"n_classes": True}, "n_classes must be None or an int >= 1"),
                    ({"purity_threshold": 1.5}, "purity_threshold must be a number in [0, 1]"),
                    ({"purity_threshold": "0.7"}, "purity_threshold must be a number in [0, 1]"),
                    ({"probe": [[1.0, 2.0]]}, "probe must be None or a non-empty batched floating-point tensor"),
                    ({"probe": torch.zeros(0, 2)}, "probe must be None or a non-empty batched")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            RegionMonitor(**kw)
    # before: at the first batch ('str' object is not callable), or never (prefix=None logged "Noneval/...")
    for kw, msg in [({"get_labels": "y"}, "get_labels must be a function of the batch"),
                    ({"get_inputs": "x"}, "get_inputs must be a function of the batch"),
                    ({"prefix": None}, "prefix must be a str"), ({"stages": None}, "stages must be a stage"),
                    ({"granularities": ["last"]}, "granularities must be a dict"),
                    ({"module": 3}, "module must be None or a str")]:
        with pytest.raises(TypeError, match=re.escape(msg)):
            RegionMonitor(**kw)
    # one-hot labels (before: flattened to B·C labels, "the model ran on inputs that do not match the labels")
    with pytest.raises(ValueError, match=r"RegionMonitor: labels must hold one class index per sample.*\(16, 3\)"):
        trainer([RegionMonitor(3, get_labels=lambda b: torch.nn.functional.one_hot(b["label"], 3),
                               probe_size=0)]).test(model, dict_loader)
    assert _hooks(model) == hooks
    failing = Lit()
    failing.fail = True
    hooks = _hooks(failing)
    with pytest.raises(RuntimeError, match="user step failed"):
        trainer([RegionMonitor(3)]).test(failing, loader(ds))
    assert _hooks(failing) == hooks  # on_exception removed the recording hooks


def test_every_n_epochs_and_checkpoint_round_trip(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, val = make_data(64, 0), make_data(48, 1)
    mon = RegionMonitor(every_n_epochs=2, probe_size=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer([mon, ckpt], tmp_path, max_epochs=4, enable_checkpointing=True).fit(Lit(), loader(train), loader(val))
    assert [h["epoch"] for h in mon.history] == [1, 3]
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][mon.state_key]
    fresh = RegionMonitor(every_n_epochs=2, probe_size=8)
    fresh.load_state_dict(state)
    assert fresh.history == mon.history
    assert torch.equal(fresh.probe, mon.probe)
    a, b = fresh.stats["val"], mon.stats["val"]
    assert torch.equal(a.region_keys(), b.region_keys()) and torch.equal(a.sizes(), b.sizes())
    # resuming a fit restores the callback's state through Lightning
    resumed = RegionMonitor(every_n_epochs=2, probe_size=8)
    trainer([resumed, ModelCheckpoint(dirpath=tmp_path / "r")], tmp_path, max_epochs=4,
            enable_checkpointing=True).fit(Lit(), loader(train), loader(val), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.history == mon.history
    # settings that disagree with the checkpoint's run are refused (before, the checkpoint's silently replaced
    # them); an explicit probe= stays, with a warning
    with pytest.raises(ValueError, match=f"count {mon.n_classes} classes.*n_classes=7"):
        RegionMonitor(7, every_n_epochs=2).load_state_dict(state)
    with pytest.raises(ValueError, match="'val' statistics do not fit.*granularit"):
        RegionMonitor(granularities={"last": -1}).load_state_dict(state)
    mine = RegionMonitor(probe=mon.probe[:3] + 1)
    with pytest.warns(UserWarning, match="probe= differs"):
        mine.load_state_dict(state)
    assert torch.equal(mine.probe, mon.probe[:3] + 1) and mine.history == mon.history


def test_probe_every_n_epochs_and_the_slow_probe_warning(monkeypatch):
    import relu_regions.integrations.lightning as L

    train, val = make_data(64, 0), make_data(48, 1)
    mon = RegionMonitor(probe_size=8, probe_every_n_epochs=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer([mon], max_epochs=5).fit(Lit(), loader(train), loader(val))
    assert [h["epoch"] for h in mon.history] == [0, 1, 2, 3, 4]
    assert ["boundary_distance_median" in h for h in mon.history] == [True, False, True, False, True]
    assert not [w for w in seen if "boundary distance" in str(w.message)]  # a tiny MLP's probe is fast
    assert mon.state_dict()["probe_epochs"] == 5
    # a probe slower than its epoch (and than the floor, here 0 s) is reported once, with the way out
    monkeypatch.setattr(L, "_SLOW_PROBE_SECONDS", 0.0)
    def slow_probe(self, m):  # always longer than the epoch so far
        time.sleep(time.perf_counter() - self._epoch_start["validate"] + 0.05)
        return 1.0

    monkeypatch.setattr(RegionMonitor, "probe_distance", slow_probe)
    mon2 = RegionMonitor(probe_size=8)
    with pytest.warns(UserWarning, match="probe_size x input features") as seen:
        trainer([mon2], max_epochs=2).fit(Lit(), loader(train), loader(val))
    assert sum("boundary distance" in str(w.message) for w in seen) == 1
    assert [h["boundary_distance_median"] for h in mon2.history] == [1.0, 1.0]
    with pytest.raises(ValueError, match="probe_every_n_epochs"):
        RegionMonitor(probe_every_n_epochs=0)


def test_compare_in_the_loop_logs_the_table(tmp_path):
    pytest.importorskip("captum")
    from lightning.pytorch.loggers import CSVLogger

    ds = make_data(32)
    mon = RegionMonitor(3, probe_size=6, compare=True,
                        compare_kwargs={"methods": ["Saliency", "InputXGradient"], "n_steps": 4})
    t = trainer([mon], tmp_path, logger=CSVLogger(tmp_path))
    model = Lit()
    t.test(model, loader(ds))
    assert len(mon.comparisons) == 1
    table = mon.comparisons[0][2].table
    assert list(table["method"]) == ["Re3", "Saliency", "InputXGradient"]
    # Re3 agrees with itself; the logged value is the table's
    assert t.callback_metrics["regions/test/compare/Re3/spearman"].item() == pytest.approx(1.0)
    v = float(table.set_index("method").loc["InputXGradient", "spearman"])
    assert t.callback_metrics["regions/test/compare/InputXGradient/spearman"].item() == pytest.approx(v, rel=1e-6)
    assert list(tmp_path.rglob("region_compare_test_epoch0.csv"))
    assert not RegionMonitor(3).compare  # off by default


def _ddp_job(out_path: str, devices: int, strategy: str) -> None:
    """Fit with lr=0 (weights unchanged, so both runs see the same model); write rank 0's logged metrics."""
    train, val = make_data(64, 0), make_data(48, 1)
    mon = RegionMonitor(train_every_n_batches=1, probe_size=16, granularities={"last": -1})
    t = trainer([mon], max_epochs=1, devices=devices, strategy=strategy, num_nodes=1, num_sanity_val_steps=0,
                use_distributed_sampler=True)
    model = Lit(lr=0.0)
    t.fit(model, loader(train, 8), loader(val, 8))  # one spawn only: each costs two fresh interpreters
    fit_metrics = {k: v.item() for k, v in t.callback_metrics.items() if k.startswith("regions/")}
    with open(out_path, "w") as f:
        json.dump({"fit": fit_metrics}, f)


def _run_ddp_job(tmp_path):
    out = tmp_path / "metrics_ddp.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, __file__, str(out), "2", "ddp_spawn"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the launcher and its spawned workers
        proc.communicate()
        pytest.fail("the DDP run did not finish within 240 s")
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ddp_two_processes_log_exactly_the_single_process_numbers(tmp_path):
    _ddp_job(str(tmp_path / "single.json"), 1, "auto")  # in this process
    single = json.loads((tmp_path / "single.json").read_text())
    ddp = _run_ddp_job(tmp_path)
    assert "regions/val/train_overlap" in single["fit"] and "regions/val/n_regions_last" in single["fit"]
    assert "regions/val/boundary_distance_median" in single["fit"] and "regions/train/n_regions" in single["fit"]
    assert ddp == single


if __name__ == "__main__":
    torch.set_num_threads(1)
    _ddp_job(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter shutdown, which can wait on the finished workers' resources


def test_several_validation_and_test_loaders_get_their_own_statistics():
    """Two evaluation loaders: one RegionStats per loader, equal to an independent evaluation of that loader alone,
    logged with Lightning's "/dataloader_idx_<k>" suffix; the probe (from loader 0) is logged with loader 0."""

    class TwoLoaders(Lit):
        def validation_step(self, batch, i, dataloader_idx=0):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def test_step(self, batch, i, dataloader_idx=0):
            x, y = batch
            self.log("test_loss", F.cross_entropy(self(x), y))

    a, b = make_data(48, 1), make_data(32, 7)
    model = TwoLoaders()
    mon = RegionMonitor(3, probe_size=8)
    t = trainer([mon], max_epochs=1)
    t.fit(model, loader(make_data(64, 0)), [loader(a), loader(b)])
    for k, ds in enumerate((a, b)):
        ev = evaluate(model.net, loader(ds), n_classes=3)
        st = mon.stats[f"val/dataloader_idx_{k}"]
        assert st.n_samples == len(ds) and st.n_regions() == ev.n_regions() and st.accuracy == ev.accuracy
        assert st.mean_purity() == pytest.approx(ev.mean_purity(), rel=1e-12)  # summed in another order
        assert t.callback_metrics[f"regions/val/n_regions/dataloader_idx_{k}"].item() == ev.n_regions()
    assert "val" not in mon.stats
    rows = [h["stage"] for h in mon.history]
    assert rows == ["val/dataloader_idx_0", "val/dataloader_idx_1"]
    assert "boundary_distance_median" in mon.history[0] and "boundary_distance_median" not in mon.history[1]
    assert torch.equal(mon.probe, a.tensors[0][:8])
    t2 = trainer([mon])
    t2.test(model, [loader(b), loader(a)])
    assert mon.stats["test/dataloader_idx_0"].n_samples == len(b) and mon.stats["test/dataloader_idx_1"].n_samples == 48
    assert t2.callback_metrics["regions/test/accuracy/dataloader_idx_1"].item() == pytest.approx(
        evaluate(model.net, loader(a), n_classes=3).accuracy)
    t3 = trainer([mon])
    t3.validate(model, loader(b), verbose=False)  # back to one loader: no suffix
    assert mon.stats["val"].n_samples == len(b) and "regions/val/n_regions" in t3.callback_metrics


def test_a_compiled_network_gets_the_plain_networks_statistics_and_probe_distance():
    """A ``torch.compile``'d network in the LightningModule: the steps run it compiled (recorded as they run, also
    the monitor's eval-mode pass over training batches); the probe's forward-mode passes, to which compiled code
    would silently give no tangents (``inf``), run it eagerly and compile nothing. Same numbers as the plain
    network."""
    train, val = make_data(64, 0), make_data(48, 1)
    seen, compiles = [], []
    for compiled, kw in ((False, {}), (True, {}), (True, {"probe_size": 0, "stages": ("validate",)})):
        torch._dynamo.reset()  # compilations are cached per code object, across models
        graphs = []

        def backend(gm, example_inputs, graphs=graphs):
            graphs.append(gm)
            return gm.forward

        model = Lit()
        if compiled:
            model.net = torch.compile(model.net, backend=backend)
        mon = RegionMonitor(**{"probe_size": 20, "train_every_n_batches": 1, **kw})
        trainer([mon], max_epochs=1).fit(model, loader(train), loader(val))
        if not kw:
            row = [h for h in mon.history if h["stage"] == "val"][-1]
            seen.append((mon.stats["val"].n_regions(), mon.stats["val"].coverage(1), mon.stats["train"].n_regions(),
                         row["boundary_distance_median"]))
        if compiled:
            compiles.append(len(graphs))
    assert seen[1] == seen[0] and 0 < seen[0][3] < float("inf")
    assert compiles[0] == compiles[1] > 0  # neither the probe nor the training-batch pass compiled more


def test_a_network_with_inplace_relus_gets_the_probe_distance_of_the_same_network_without():
    """torchvision-style ResNet (BatchNorm, ``nn.ReLU(inplace=True)``, ``out += identity``): the probe's distance
    read overwritten pre-activations before (every distance 0 on the structured route). Now the logged median and
    statistics are those of the same network with ``inplace=False``, computed by ``boundary_distance`` and
    ``evaluate``."""
    import copy
    import sys
    from pathlib import Path

    import relu_regions.geometry as G

    sys.path.insert(0, str(Path(__file__).parent))
    from zoo import ResNetCNN

    class LitResNet(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.net = ResNetCNN().eval()

        def forward(self, x):
            return self.net(x)

        def validation_step(self, batch, i):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

    g = torch.Generator().manual_seed(4)
    x = torch.randn(24, 1, 12, 12, generator=g)
    x = x[[3, 4, 6] + [i for i in range(24) if i not in (3, 4, 6)]]  # the probe: images whose distances it got wrong
    val = torch.utils.data.TensorDataset(x, torch.randint(0, 4, (24,), generator=g))
    model = LitResNet()
    plain = copy.deepcopy(model.net)
    for m in plain.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    mon = RegionMonitor(probe_size=3)
    trainer([mon]).validate(model, loader(val, bs=8), verbose=False)
    d = G.boundary_distance(plain, x[:3]).distance
    assert (d > 0).any()
    assert mon.history[-1]["boundary_distance_median"] == pytest.approx(float(d[d.isfinite()].median()), rel=1e-5)
    ev = evaluate(plain, loader(val, bs=8), n_classes=4)
    assert mon.stats["val"].n_regions() == ev.n_regions() and mon.stats["val"].accuracy == ev.accuracy


def test_standalone_validate_probe_collate_and_one_monitor_per_stage():
    """Before: ``every_n_epochs=2`` also skipped a standalone ``trainer.validate()`` (nothing recorded, no word);
    the default probe bypassed the loader's ``collate_fn`` (its distance was of inputs the model never saw: 0.9994
    against 0.0564 in the QA repro); two monitors of one stage failed at the first batch with advice about
    ``module=``; an earlier epoch's ``stats["val"]`` stayed beside a later epoch's per-loader entries; ``evaluate``
    took ``n_classes`` from the model's final output, not from ``logits_at``'s."""
    val = make_data(48, 1)
    mon = RegionMonitor(every_n_epochs=2, probe_size=0)
    trainer([mon]).validate(Lit(), loader(val))
    assert [h["stage"] for h in mon.history] == ["val"] and mon.stats["val"].n_samples == 48

    def scaled(items):  # the loader's own preprocessing
        x, y = torch.utils.data.default_collate(items)
        return 3 * x + 1, y

    model = Lit()
    mon = RegionMonitor(probe_size=8)
    trainer([mon]).validate(model, torch.utils.data.DataLoader(val, batch_size=16, collate_fn=scaled))
    assert torch.equal(mon.probe, 3 * val.tensors[0][:8] + 1)
    want = boundary_distances(model.net, mon.probe).median()  # (an MLP: the nearest ReLU hyperplane)
    assert mon.history[-1]["boundary_distance_median"] == pytest.approx(float(want), rel=1e-5)

    with pytest.raises(ValueError, match=r"several RegionMonitor callbacks record the stage\(s\) \['validate'\]"):
        trainer([RegionMonitor(probe_size=0), RegionMonitor(stages="validate", probe_size=0, prefix="b/")]).validate(
            Lit(), loader(val))
    trainer([RegionMonitor(stages="validate", probe_size=0),
             RegionMonitor(stages="test", probe_size=0, prefix="b/")]).validate(Lit(), loader(val))

    class TwoLoaders(Lit):
        def validation_step(self, batch, i, dataloader_idx=0):
            self(batch[0])

    mon = RegionMonitor(probe_size=0)
    trainer([mon]).validate(TwoLoaders(), loader(val))
    trainer([mon]).validate(TwoLoaders(), [loader(val), loader(make_data(32, 2))])
    assert sorted(mon.stats) == ["val/dataloader_idx_0", "val/dataloader_idx_1"]

    class Head(torch.nn.Module):  # logits_at's 4 outputs, then a 3-wide head
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body, self.head = mlp(2, [6], 4), torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.body(x))

    ds = torch.utils.data.TensorDataset(val.tensors[0], val.tensors[1] + 1)  # labels 1..3 of 4 classes
    assert evaluate(Head(), loader(ds), logits_at="body").n_classes == 4  # before: "y_pred ... got 0..3"


@pytest.mark.parametrize("functional", [False, True], ids=["hook-route", "function-mode"])
def test_the_steps_pass_on_the_batch_is_taken_among_several(functional):
    """A step that also runs the model on an augmented copy, or a callback listed before the monitor that runs it
    after the step: before, the statistics were those of the last pass (the copy's; equal to evaluate() on x + 0.5,
    not on x), or a ValueError blamed the inputs when the sizes differed. The pass on the batch's own input tensor
    is taken now."""

    class Twice(Lit):
        def validation_step(self, batch, i):
            x, y = batch
            self(x)
            self(x[:5] + 0.5)

    class Perturb(pl.Callback):
        def on_validation_batch_end(self, trainer, m, outputs, batch, i, dataloader_idx=0):
            m(batch[0] + 1.0)

    val = make_data(48, 1)
    model = Twice(functional=functional)
    ev = evaluate(model.net, loader(val), n_classes=3)
    for callbacks in (lambda mon: [mon], lambda mon: [Perturb(), mon]):
        mon = RegionMonitor(3, probe_size=0)
        trainer(callbacks(mon)).validate(model, loader(val))
        st = mon.stats["val"]
        assert (st.n_regions(), st.coverage(1), st.accuracy) == (ev.n_regions(), ev.coverage(1), ev.accuracy)
        assert torch.equal(st.region_keys().sort().values, ev.region_keys().sort().values)
        assert st.mean_purity() == pytest.approx(ev.mean_purity(), rel=1e-12)  # (a sum in another order)


def _relu_keys(net, x):
    """Independent region keys: the on/off mask of every nn.ReLU output of the eval-mode network, per sample."""
    masks = []
    handles = [m.register_forward_hook(lambda m, a, o: masks.append((o > 0).reshape(len(o), -1)))
               for m in net.modules() if isinstance(m, torch.nn.ReLU)]
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
        net.train(was)
    return [tuple(row.tolist()) for row in torch.cat(masks, 1)]


def _overlap(train_keys, val_keys):
    seen = set(train_keys)
    return sum(k in seen for k in val_keys) / len(val_keys)


def test_a_standalone_validate_after_fit_logs_no_train_overlap():
    """Before: a ``trainer.validate()`` after ``fit`` logged ``train_overlap`` against the training regions of the
    fit's last epoch (the "train" stage stayed active; 0.41 in the QA repro). Now only the fit's own validations
    log it (equal to the hand-computed share), the later validation logs its regions and no overlap."""
    train, val, other = make_data(64, 0), make_data(48, 1), make_data(40, 5)
    model = Lit(lr=0.0)  # fixed weights: every training batch's regions are those of the final network
    mon = RegionMonitor(3, train_every_n_batches=1, probe_size=0)
    trainer([mon], max_epochs=1, num_sanity_val_steps=0).fit(model, loader(train), loader(val))
    fit_row = next(h for h in mon.history if h["stage"] == "val")
    train_keys = _relu_keys(model.net, train.tensors[0])
    assert fit_row["train_overlap"] == pytest.approx(_overlap(train_keys, _relu_keys(model.net, val.tensors[0])))
    assert _overlap(train_keys, _relu_keys(model.net, other.tensors[0])) > 0  # a stale overlap would show
    t = trainer([mon])
    t.validate(model, loader(other), verbose=False)
    row = mon.history[-1]
    assert row["stage"] == "val" and "train_overlap" not in row
    assert "regions/val/train_overlap" not in t.callback_metrics
    assert row["n_regions"] == len(set(_relu_keys(model.net, other.tensors[0])))


class _Noisy(torch.utils.data.Dataset):
    """A randomly augmenting data set: draws from torch's, Python's and NumPy's global generators per item."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        import random

        import numpy as np

        x, y = self.ds[i]
        return x + 0.1 * torch.randn(2) + 0.01 * random.random() + 0.01 * float(np.random.rand()), y


def test_the_default_probe_leaves_the_random_generators_as_they_were():
    """Before: the default probe read the validation set's first items outside the data loader, drawing from the
    global generators when the data set augments randomly: the next epoch's shuffle, and so the trained weights,
    differed from the same run without the monitor. Now weights and generator states equal that run's."""
    import random

    import numpy as np

    train, val = make_data(64, 0), make_data(32, 1)

    def run(callbacks):
        torch.manual_seed(7)
        random.seed(7)
        np.random.seed(7)
        model = Lit(lr=0.5)
        trainer(callbacks, max_epochs=2, num_sanity_val_steps=0).fit(
            model, torch.utils.data.DataLoader(train, batch_size=16, shuffle=True),
            torch.utils.data.DataLoader(_Noisy(val), batch_size=16))
        return model.state_dict(), torch.get_rng_state(), random.getstate(), np.random.get_state()[1]

    w0, torch0, py0, np0 = run([])
    mon = RegionMonitor(3, probe_size=4)
    w1, torch1, py1, np1 = run([mon])
    assert mon.probe.shape == (4, 2) and "boundary_distance_median" in mon.history[-1]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert torch.equal(torch0, torch1) and py0 == py1 and np.array_equal(np0, np1)


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 2, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0, 0] > 0).long() + (x[:, 1, 0] > 0.5).long())


class LitFlat(Lit):
    """Images in the loader, a flat MLP: the step reshapes the batch before calling the model."""

    def __init__(self, **kw):
        super().__init__(**kw)
        torch.manual_seed(0)
        self.net = mlp(4, [6, 5], 3)

    def _xy(self, batch):
        x, y = batch
        return x.flatten(1), y


def _hand_distance_median(net, x):
    """Lower median over ``x`` of the distance to the nearest ReLU hyperplane, min |z_i| / ||grad z_i|| over the
    pre-activations z of the MLP (torch.func's Jacobian); for an MLP, the distance to the region's boundary."""
    from torch.func import jacrev

    def pre(v):
        z1 = net[0](v)
        return torch.cat([z1, net[2](torch.relu(z1))])

    out = []
    for v in x:
        z, g = pre(v).detach(), jacrev(pre)(v).detach().norm(dim=1)
        out.append(min(float(a.abs() / b) for a, b in zip(z, g) if b > 0))
    return float(torch.tensor(out).median())


def test_a_step_that_reshapes_the_batch_gets_the_probe_and_training_pass_of_its_own_inputs():
    """Before: with ``self(x.flatten(1))`` in the step, the default probe (the data set's images) and the pass over
    training batches (``get_inputs(batch)``) were fed the images and ended ``fit`` with torch's raw "mat1 and mat2
    shapes cannot be multiplied". Now both take the inputs the step fed the module (statistics and distance equal
    hand computations on the flattened data); a ``probe=`` of images is reported at the first batch and its
    failure names the probe; a step that bypasses the module gets an error naming ``get_inputs=``."""
    train, val = _images(64, 0), _images(48, 1)
    model = LitFlat(lr=0.0)
    hooks = _hooks(model)
    mon = RegionMonitor(3, train_every_n_batches=1, probe_size=8)
    trainer([mon], max_epochs=1, num_sanity_val_steps=0).fit(model, loader(train), loader(val))
    flat = val.tensors[0].flatten(1)
    assert torch.equal(mon.probe, flat[:8])
    row = next(h for h in mon.history if h["stage"] == "val")
    assert row["boundary_distance_median"] == pytest.approx(_hand_distance_median(model.net, flat[:8]), rel=1e-5)
    train_keys = _relu_keys(model.net, train.tensors[0].flatten(1))
    assert mon.stats["train"].n_samples == 64 and mon.stats["train"].n_regions() == len(set(train_keys))
    assert _hooks(model) == hooks
    with warnings.catch_warnings(record=True) as seen, pytest.raises(RuntimeError) as err:
        warnings.simplefilter("always")
        trainer([RegionMonitor(3, probe=val.tensors[0][:4])]).validate(model, loader(val), verbose=False)
    assert [str(w.message) for w in seen if "probe= holds inputs of shape (2, 2)" in str(w.message)]
    assert "RegionMonitor: the boundary distance of the probe" in str(err.value) and "probe=" in str(err.value)
    assert _hooks(model) == hooks

    class Bypass(LitFlat):  # the step calls the network, the monitor records the LightningModule
        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self.net(x.flatten(1)), y)

    with pytest.raises(RuntimeError, match=r"get_inputs\(batch\), of shape \(16, 2, 2\).*get_inputs="):
        trainer([RegionMonitor(3, stages=["train"])], max_epochs=1).fit(Bypass(), loader(train))


class _TrainBatches(pl.Callback):
    def __init__(self):
        self.x = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.x.append(batch[0])


def test_a_fit_resumed_inside_an_epoch_records_the_rest_of_its_training_batches(tmp_path):
    """Before: Lightning skips ``on_train_epoch_start`` of an epoch resumed from a checkpoint saved inside it, and
    the "train" stage stayed off: no training batch of the epoch was recorded, its validation had no
    ``train_overlap`` and no training row was logged. Now the stage starts at the first training batch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, val = make_data(64, 0), make_data(48, 1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer([RegionMonitor(3, train_every_n_batches=1, probe_size=0), ckpt], tmp_path, max_epochs=1,
            num_sanity_val_steps=0, enable_checkpointing=True).fit(Lit(lr=0.0), loader(train), loader(val))
    mon, batches = RegionMonitor(3, train_every_n_batches=1, probe_size=0), _TrainBatches()
    model = Lit(lr=0.0)
    trainer([mon, batches], tmp_path, max_epochs=1, num_sanity_val_steps=0).fit(
        model, loader(train), loader(val), ckpt_path=str(tmp_path / "step=2.ckpt"))
    x = torch.cat(batches.x)
    assert 0 < len(x) < 64  # the batches after the resume
    keys = _relu_keys(model.net, x)
    assert mon.stats["train"].n_samples == len(x) and mon.stats["train"].n_regions() == len(set(keys))
    assert [(h["epoch"], h["stage"]) for h in mon.history] == [(0, "val"), (0, "train")]
    val_keys = _relu_keys(model.net, val.tensors[0])
    assert mon.history[0]["train_overlap"] == pytest.approx(_overlap(keys, val_keys))


def test_test_and_validate_with_ckpt_path_keep_the_monitors_history(tmp_path):
    """Before: Lightning restores callbacks for every ckpt_path, and trainer.test(ckpt_path="best") after a fit
    rolled the monitor's history and statistics back to the best epoch's (validate: epochs 1, 2 gone)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, val = make_data(64, 0), make_data(48, 1)
    mon = RegionMonitor(probe_size=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="regions/val/mean_purity", mode="max")
    t = trainer([mon, ckpt], tmp_path, max_epochs=3, enable_checkpointing=True, num_sanity_val_steps=0)
    model = Lit(lr=0.5)
    t.fit(model, loader(train), loader(val))
    rows = [dict(h) for h in mon.history]
    val_stats = mon.stats["val"]
    assert [h["epoch"] for h in rows if h["stage"] == "val"] == [0, 1, 2]
    t.test(model, loader(val), ckpt_path="best")
    t.validate(model, loader(val), ckpt_path="best")
    assert mon.history[:len(rows)] == rows
    assert [h["stage"] for h in mon.history[len(rows):]] == ["test", "val"]
    # the new rows are those of the best checkpoint's weights: as an independent evaluation of them
    best = Lit()
    best.load_state_dict(torch.load(ckpt.best_model_path, weights_only=False)["state_dict"])
    ref = evaluate(best, loader(val), n_classes=3, progress=False)
    assert mon.history[-1]["n_regions"] == ref.n_regions() and mon.history[-1]["accuracy"] == ref.accuracy
    assert mon.stats["val"] is not val_stats
    # a fit from the checkpoint still resumes the monitor's state
    resumed = RegionMonitor(probe_size=0)
    trainer([resumed], tmp_path, max_epochs=4, enable_checkpointing=True, num_sanity_val_steps=0).fit(
        Lit(lr=0.5), loader(train), loader(val), ckpt_path=ckpt.best_model_path)
    assert resumed.history[0]["epoch"] == 0 and len(resumed.history) > 2


def test_history_rows_carry_the_step_and_plot_by_it(tmp_path):
    """Before: with val_check_interval < 1, the rows of one epoch's validations were {"epoch": 0, ...} alike and
    plot_history drew them at one x."""
    import matplotlib

    matplotlib.use("Agg")
    mon = RegionMonitor(probe_size=0)
    trainer([mon], max_epochs=1, val_check_interval=0.25, num_sanity_val_steps=0).fit(
        Lit(), loader(make_data(64, 0), 8), loader(make_data(16, 1)))
    rows = [h for h in mon.history if h["stage"] == "val"]
    assert [(h["epoch"], h["step"]) for h in rows] == [(0, 2), (0, 4), (0, 6), (0, 8)]
    ax = mon.plot_history(stages=("val",))
    assert list(ax.lines[0].get_xdata()) == [2, 4, 6, 8] and ax.get_xlabel() == "training step"


def test_bf16_mixed_records_training_batches_under_the_steps_autocast():
    """Before: under precision="bf16-mixed" the validation regions came from the autocast forward, the extra pass
    over training batches from a float32 one: with fixed weights and the same data, train_overlap read < 1. (And the
    keys' own float32 products ran in bfloat16 under an autocast: other keys for the same patterns.)"""
    ds = make_data(256, 0)
    mon = RegionMonitor(probe_size=0, train_every_n_batches=1)
    model = Lit(lr=0.0)
    model.net = mlp(2, [64, 64], 3)
    with pytest.warns(UserWarning, match="regions counted are those of the autocast forward"):
        trainer([mon], max_epochs=1, precision="bf16-mixed", num_sanity_val_steps=0).fit(
            model, loader(ds, 64), loader(ds, 64))
    row = next(h for h in mon.history if h["stage"] == "val")
    assert row["train_overlap"] == 1.0
    assert mon.stats["train"].n_regions() == mon.stats["val"].n_regions() == row["n_regions"]
    # the regions counted are the autocast forward's: as recorded by hand under the same autocast
    import relu_regions as rr

    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), torch.no_grad():
        with rr.record(model.net) as rec:
            model.net(ds.tensors[0])
    assert rec.region_ids().unique().numel() == row["n_regions"]
