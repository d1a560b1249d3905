import io
import pickle
import warnings

import pytest
import torch

import relu_regions as rr
from relu_regions.models import mlp
from relu_regions.regions import RegionStats, affine_map_keys


def _by_key(stats, granularity="full"):
    t = stats.tables[granularity]
    return {k: (int(t.count[i]), t.true[i].tolist(), t.pred[i].tolist()) for i, k in enumerate(t.keys.tolist())}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = mlp(4, [6, 5], 3)
    x = torch.randn(400, 4)
    y = torch.randint(0, 3, (400,))
    return model, x, y


def _stats(model, x, y, **kw):
    s = RegionStats(3, granularities={"last": -1, "first": 0}, keep_inputs=True, keep_contributions=True, **kw)
    amap = rr.affine_map(model, x)  # outside the record block: its own passes would be recorded too
    with rr.record(model) as rec:
        out = model(x)
        s.update_from_recording(rec, y, out.argmax(1), inputs=x, contributions=amap.A * x[:, None],
                                weights=amap.A)
    return s


def test_counts_match_brute_force(setup):
    model, x, y = setup
    s = _stats(model, x, y)
    with rr.record(model) as rec:
        model(x)
        packed = rec.packed()
        last = rec.packed(-1)
    # independent route: distinct rows of the exact packed patterns
    assert s.n_regions() == torch.unique(packed, dim=0).shape[0]
    assert s.n_regions("last") == torch.unique(last, dim=0).shape[0]
    assert s.n_regions("last") <= s.n_regions()
    assert int(s.sizes().sum()) == 400
    # purity from a direct pandas groupby
    import pandas as pd

    keys = rr.keys.region_keys(packed)
    df = pd.DataFrame({"k": keys.tolist(), "y": y.tolist()})
    pur = df.groupby("k")["y"].agg(lambda v: v.value_counts().iloc[0] / len(v))
    ours = dict(zip(s.region_keys().tolist(), s.purity().tolist()))
    for k, v in pur.items():
        assert ours[k] == pytest.approx(v)
    # mean inputs per region vs direct means
    mi = s.mean_inputs()
    for i, k in enumerate(s.region_keys().tolist()[:10]):
        assert torch.allclose(mi[i].float(), x[keys == k].mean(0), atol=1e-6)


def test_merge_halves_equals_whole(setup):
    model, x, y = setup
    whole = _stats(model, x, y)
    a = _stats(model, x[:170], y[:170])
    b = _stats(model, x[170:], y[170:])
    a.merge(b)
    for g in ("full", "last", "first"):
        assert _by_key(a, g) == _by_key(whole, g)
    assert a.n_samples == whole.n_samples and a.n_correct == whole.n_correct
    order = a.tables["full"].find(whole.tables["full"].keys)
    assert bool((order >= 0).all())
    assert torch.allclose(a.mean_contributions()[order], whole.mean_contributions(), atol=1e-12)
    for k, v in whole.activation_frequencies().items():
        assert torch.equal(a.activation_frequencies()[k], v)
    assert torch.equal(a.top_contributor, whole.top_contributor)
    assert a.coverage(1) == whole.coverage(1)
    assert a.mean_purity() == pytest.approx(whole.mean_purity())


def test_state_dict_round_trip(setup):
    model, x, y = setup
    s = _stats(model, x, y)
    blob = pickle.dumps(s.state_dict())
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    for st in (pickle.loads(blob), torch.load(buf, weights_only=False)):
        r = RegionStats(3).load_state_dict(st)
        for g in ("full", "last", "first"):
            assert _by_key(r, g) == _by_key(s, g)
        assert r.granularities["last"] == -1
        assert torch.equal(r.mean_weights(), s.mean_weights())
        assert r.summary()["overview"].equals(s.summary()["overview"])


def test_memory_is_o_regions():
    # a single region repeated many times: storage must not grow with samples
    s = RegionStats(2, keep_inputs=True)
    for _ in range(20):
        s.update(torch.zeros(1000, dtype=torch.int64), torch.zeros(1000, dtype=torch.long),
                 torch.zeros(1000, dtype=torch.long), inputs=torch.ones(1000, 7))
    t = s.tables["full"]
    assert len(t) == 1 and t.count.numel() == 1 and t.sums["inputs"].shape == (1, 7)
    assert int(t.count[0]) == 20000


def test_summary_of_many_features_builds_its_frames_at_once():
    # many features (spambase has 57, and the mean weights add as many): the columns were inserted one by one, and
    # pandas warned of a fragmented frame
    pd = pytest.importorskip("pandas")
    s = RegionStats(2, keep_inputs=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 120, generator=g)
    y = torch.randint(0, 2, (40,), generator=g)
    keys = torch.randint(0, 5, (40,), generator=g)
    s.update(keys, y, y, inputs=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        out = s.summary()
    cl, reg = out["clusters"], out["regions"]
    assert [c for c in cl.columns if c.startswith("x_")] == [f"x_{i}" for i in range(120)]
    for _, row in cl.iterrows():  # the region's mean input and positive rate, by hand
        mine = keys == int(row["key"])
        assert row["support"] == int(mine.sum())
        assert row["positive_rate"] == pytest.approx(float(y[mine].double().mean()))
        assert [row[f"x_{i}"] for i in range(120)] == pytest.approx(x[mine].double().mean(0).tolist(), abs=1e-6)
    assert list(reg.columns[:5]) == ["key", "size", "majority", "purity", "confused"]
    assert list(reg.columns[5:]) == ["true_0", "true_1", "pred_0", "pred_1"]


def test_largest_regions_do_not_depend_on_the_batching():
    # the regions, their sizes and the "largest regions" listed: equal sizes used to keep the order in which batches
    # first saw the regions, so batch 7 and one batch of 400 listed different regions (singletons at the cut-off)
    pytest.importorskip("pandas")
    g = torch.Generator().manual_seed(1)
    keys = torch.randint(0, 300, (400,), generator=g) * 7919
    y = torch.randint(0, 3, (400,), generator=g)
    one, small = RegionStats(3), RegionStats(3)
    one.update(keys, y, y)
    perm = torch.randperm(400, generator=g)
    for i in range(0, 400, 7):
        small.update(keys[perm[i:i + 7]], y[perm[i:i + 7]], y[perm[i:i + 7]])
    a, b = one.summary()["regions"], small.summary()["regions"]
    assert a.equals(b) and one.to_markdown(max_regions=10) == small.to_markdown(max_regions=10)
    # by hand: sizes descending, equal sizes by ascending key
    uk, cnt = torch.unique(keys, return_counts=True)
    want = sorted(zip(cnt.tolist(), uk.tolist()), key=lambda t: (-t[0], t[1]))
    assert list(zip(a["size"], a["key"])) == want


def test_coverage_overlap_confusion_by_hand():
    s = RegionStats(2)
    keys = torch.tensor([1, 1, 1, 2, 2, 3, 4, 4])
    yt = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0])
    s.update(keys, yt, yt)
    # regions: 1 -> [2,1] maj 0 purity 2/3 ; 2 -> [0,2] maj 1 ; 3 -> [1,0] maj 0 ; 4 -> [1,1] maj 0 (tie) purity .5
    assert s.n_regions() == 4
    assert s.confusion_share() == pytest.approx(2 / 4)
    assert s.mean_purity() == pytest.approx((2 / 3 + 1 + 1 + 0.5) / 4)
    # top-1: class 0 largest region = key 1 (2 samples of class 0); class 1 largest = key 2 (2) -> 4/8
    assert s.coverage(1) == pytest.approx(4 / 8)
    assert s.coverage(2) == pytest.approx(5 / 8)
    t = RegionStats(2).update(torch.tensor([1, 5, 5, 2]), torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 1, 0]))
    assert s.overlap(t) == pytest.approx(2 / 4)
    assert s.similar_regions(t) == {"similar": 2, "dissimilar": 1}
    md = s.to_markdown()
    assert "| granularity |" in md


def test_bad_input_messages():
    s = RegionStats(3)
    with pytest.raises(ValueError, match="y_true"):
        s.update(torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 3]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="entries"):
        s.update(torch.zeros(3, dtype=torch.long), torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    assert s.n_samples == 0
    with pytest.raises(KeyError, match="granularity"):
        s.n_regions("nope")


def test_affine_map_keys_count_at_most_regions(setup):
    model, x, y = setup
    amap = rr.affine_map(model, x)
    s = RegionStats(3)
    s.update({"full": amap.region_ids, "maps": affine_map_keys(amap.A, amap.d, decimals=4)}, y, y)
    assert 1 <= s.n_regions("maps") <= s.n_regions()


def test_cluster_table_binary():
    torch.manual_seed(1)
    model = mlp(3, [4], 1)
    x = torch.randn(200, 3)
    y = (x[:, 0] > 0).long()
    amap = rr.affine_map(model, x)
    s = RegionStats(2, keep_inputs=True, keep_contributions=True)
    pred = (amap.output[:, 0] > 0).long()
    s.update(amap.region_ids, y, pred, inputs=x, weights=amap.A)
    cl = s.summary(feature_names=["a", "b", "c"])["clusters"]
    assert cl["support"].sum() == 200
    assert {"x_a", "w_c", "positive_rate"} <= set(cl.columns)
    # mean effective weights equal A of each region (constant inside a region)
    for _, row in cl.iterrows():
        sel = amap.region_ids == row["key"]
        assert torch.allclose(amap.A[sel][0, 0], torch.tensor([row["w_a"], row["w_b"], row["w_c"]]).float(),
                              atol=1e-6)


def test_coverage_does_not_depend_on_batching():
    g = torch.Generator().manual_seed(3)
    keys = torch.randint(0, 40, (600,), generator=g) * 7919  # many regions of equal size
    y = torch.randint(0, 3, (600,), generator=g)
    whole = RegionStats(3).update(keys, y, y)
    parts = RegionStats(3)
    perm = torch.randperm(600, generator=g)  # a different order of first appearance
    for sl in perm.split(37):
        parts.update(keys[sl], y[sl], y[sl])
    for top in (1, 2, 3, 5):
        assert whole.coverage(top) == parts.coverage(top)
    # by hand: two regions of equal size, the one holding more of the class counts
    s = RegionStats(2).update(torch.tensor([1, 1, 2, 2]), torch.tensor([0, 1, 0, 0]), torch.tensor([0, 1, 0, 0]))
    assert s.coverage(1) == pytest.approx(2 / 4)


def test_coverage_equals_a_per_class_count_in_python():
    # the definition, class by class in plain Python: regions to their majority class (lowest index on ties), the
    # `top` largest per class (equal sizes: more samples of the class first), their samples of that class
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        n, c = 400, 5
        keys = torch.randint(0, 60 if seed % 2 else 400, (n,), generator=g)
        y = torch.randint(0, c - 1, (n,), generator=g)  # class 4 never occurs: no region is assigned to it
        s = RegionStats(c).update(keys, y, y)
        true, count = s.class_histograms().tolist(), s.sizes().tolist()
        for top in (1, 2, 3, 7, 1000):
            covered = 0
            for k in range(c):
                mine = [(count[r], true[r][k]) for r in range(len(count))
                        if max(range(c), key=lambda j: (true[r][j], -j)) == k]
                covered += sum(own for _, own in sorted(mine, reverse=True)[:top])
            assert s.coverage(top) == covered / n


def test_coverage_order_by_one_key_equals_the_lexicographic_sort():
    # coverage sorts regions by (class, -size, -own) as one int64 key, or lexicographically when that key could
    # overflow (forced here by a huge class count): the same order of tuples either way
    import numpy as np

    from relu_regions.regions import _argsort_by_class

    rng = np.random.default_rng(0)
    cls, size, own = rng.integers(0, 5, 500), rng.integers(1, 9, 500), rng.integers(0, 9, 500)
    rows = lambda order: [(cls[i], -size[i], -own[i]) for i in order]  # noqa: E731
    assert rows(_argsort_by_class(cls, size, own, 5)) == sorted(rows(range(500)))
    assert rows(_argsort_by_class(cls, size, own, 1 << 60)) == sorted(rows(range(500)))


def test_table_rows_match_a_dictionary_over_many_batches():
    """Rows come from a sorted copy and binary search; a plain dict (new keys of a batch in ascending order) must
    give the same rows, with negative, extreme and repeated keys over many batches."""
    from relu_regions.regions import _Table

    g = torch.Generator().manual_seed(5)
    t, ref = _Table(2), {}
    pool = torch.cat([torch.randint(-2**62, 2**62, (3000,), generator=g),
                      torch.tensor([-2**63, 2**63 - 1, 0, -1])])
    for _ in range(40):
        keys = pool[torch.randint(0, len(pool), (int(torch.randint(1, 400, (1,), generator=g)),), generator=g)]
        for k in sorted(set(keys.tolist())):
            ref.setdefault(k, len(ref))
        assert t.rows(keys).tolist() == [ref[k] for k in keys.tolist()]
    assert t.keys.tolist() == list(ref) and len(t) == len(ref)
    absent = torch.tensor([k for k in range(-50, 50) if k not in ref])
    assert bool((t.find(absent) == -1).all()) and t.find(t.keys).tolist() == list(range(len(ref)))


def test_many_small_batches_match_a_plain_tally_inside_and_outside_inference_mode():
    """Tables grow in place (buffers of doubling capacity, the sorted index a stack of runs merged like a binary
    counter; rebuilt per batch before, 100,000 regions in batches of 32 took 17 s). Over 1,500 small batches,
    alternately under ``torch.inference_mode``, the counts, class histograms, input sums and lookups equal a
    plain-Python tally, and a merge of two halves equals the whole."""
    from collections import defaultdict

    g = torch.Generator().manual_seed(11)
    pool = torch.cat([torch.randint(-2**62, 2**62, (2500,), generator=g), torch.tensor([-2**63, 2**63 - 1, 0])])
    whole, halves = RegionStats(4, keep_inputs=True), [RegionStats(4, keep_inputs=True) for _ in range(2)]
    count, true, pred, sums = defaultdict(int), defaultdict(lambda: [0] * 4), defaultdict(lambda: [0] * 4), {}
    for i in range(1500):
        b = int(torch.randint(1, 9, (1,), generator=g))
        keys = pool[torch.randint(0, len(pool), (b,), generator=g)]
        yt, yp = torch.randint(0, 4, (b,), generator=g), torch.randint(0, 4, (b,), generator=g)
        x = torch.randint(-3, 4, (b, 2), generator=g).double()  # integers: sums exact in any order
        with torch.inference_mode(i % 2 == 0):
            whole.update(keys, yt, yp, inputs=x)
            halves[i % 2].update(keys, yt, yp, inputs=x)
        for k, a, p_, row in zip(keys.tolist(), yt.tolist(), yp.tolist(), x.tolist()):
            count[k] += 1
            true[k][a] += 1
            pred[k][p_] += 1
            sums[k] = [u + v for u, v in zip(sums.get(k, [0, 0]), row)]
    merged = halves[0].merge(halves[1])
    for s in (whole, merged):
        t = s.tables["full"]
        assert sorted(t.keys.tolist()) == sorted(count) and len(t._runs) <= 12
        rows = t.find(torch.tensor(list(count)))
        assert t.count[rows].tolist() == list(count.values())
        assert t.true[rows].tolist() == [true[k] for k in count] and t.pred[rows].tolist() == [pred[k] for k in count]
        assert t.sums["inputs"][rows].tolist() == [sums[k] for k in count]
        assert bool((t.find(pool[~torch.isin(pool, t.keys)]) == -1).all())
        assert s.n_samples == sum(count.values())


def test_merging_an_object_into_itself_adds_a_copy():
    """``s.merge(s)``: the in-place tables failed with torch's "refer to a single memory location"; a copy is added
    (every count doubled, as before the in-place tables)."""
    s = RegionStats(3, keep_inputs=True)
    s.update(torch.tensor([5, 1, 5, 2]), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 1, 0]),
             inputs=torch.arange(8.0).reshape(4, 2))
    before = _by_key(s)
    s.merge(s)
    assert _by_key(s) == {k: (2 * c, [2 * v for v in t], [2 * v for v in p]) for k, (c, t, p) in before.items()}
    assert s.n_samples == 8 and torch.equal(s.mean_inputs()[s.region_keys() == 5], torch.tensor([[2.0, 3.0]]))


def test_stats_filled_under_inference_mode_take_updates_and_merges_outside_it(setup):
    """Statistics a Lightning validation loop fills (under ``torch.inference_mode``: ``RegionMonitor.stats``) hold
    inference tensors. Updating or merging them afterwards failed ("Inplace update to inference tensor outside
    InferenceMode"); now the result equals statistics filled outside inference mode."""
    model, x, y = setup
    with torch.inference_mode():
        a = _stats(model, x[:200], y[:200])
    b = _stats(model, x[:200], y[:200])
    for s in (a, b):
        s.merge(_stats(model, x[200:300], y[200:300]))
        amap = rr.affine_map(model, x[300:])
        with rr.record(model) as rec:
            out = model(x[300:])
            s.update_from_recording(rec, y[300:], out.argmax(1), inputs=x[300:], contributions=amap.A * x[300:, None],
                                    weights=amap.A)
    whole = _stats(model, x, y)
    for g in ("full", "last", "first"):
        assert _by_key(a, g) == _by_key(b, g) == _by_key(whole, g)
    assert a.n_samples == whole.n_samples == 400


def test_one_output_contributions_of_a_non_flat_input_are_read_right_or_refused():
    """(B, *input_shape) contributions of a one-output model with a (3, 2, 2) input were read as K=3 outputs of 4
    features (wrong top contributors and mean shape). (B, 1, *input_shape) and a flat (B, D) give the right counts;
    the (B, *input_shape) form is refused where it shows (K > n_classes, or features unlike the inputs')."""
    g = torch.Generator().manual_seed(0)
    b = 8
    contrib = torch.randn(b, 3, 2, 2, generator=g)
    keys = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    y = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0])
    # independent: each sample's largest of its 12 features, and per-region means of the flat rows
    flat = contrib.reshape(b, 12)
    want_top = torch.bincount(flat.argmax(1), minlength=12)
    want_mean = torch.stack([flat[keys == k].mean(0) for k in (0, 1, 2)]).double()
    for form in (contrib.unsqueeze(1), flat):
        s = RegionStats(2, keep_contributions=True).update(keys, y, y, contributions=form)
        assert torch.equal(s.top_contributor, want_top)
        assert s.mean_contributions().shape == (3, 1, 12)
        torch.testing.assert_close(s.mean_contributions()[:, 0], want_mean)
    with pytest.raises(ValueError, match=r"K=3 outputs for n_classes=2.*unsqueeze\(1\)"):
        RegionStats(2, keep_contributions=True).update(keys, y, y, contributions=contrib)
    s = RegionStats(3, keep_contributions=True)  # K=3 could be classes here: the inputs tell
    with pytest.raises(ValueError, match="4 features per output, inputs 12"):
        s.update(keys, y, y, inputs=torch.randn(b, 3, 2, 2), contributions=contrib)
    assert s.n_samples == 0 and s.top_contributor is None


def test_merge_refuses_differently_configured_stats(setup):
    model, x, y = setup

    def build(xx, yy, **kw):
        s = RegionStats(3, **kw)
        with rr.record(model) as rec:
            out = model(xx)
            s.update_from_recording(rec, yy, out.argmax(1), inputs=xx)
        return s

    cases = [({"granularities": {"g": 0}}, {"granularities": {"g": -1}}, "granularity 'g'"),
             ({"keep_inputs": True}, {"keep_inputs": False}, "keep_inputs"),
             ({"keep_contributions": True}, {}, "keep_contributions"),
             ({"layers": 0}, {}, "layers"),
             ({"granularities": {"g": 0}}, {}, r"\['g'\]")]
    for kw_a, kw_b, what in cases:
        a, b = build(x[:100], y[:100], **kw_a), build(x[100:], y[100:], **kw_b)
        before = _by_key(a)
        with pytest.raises(ValueError, match=what):
            a.merge(b)
        assert _by_key(a) == before and a.n_samples == 100  # refused before anything was merged
    # an ad-hoc granularity only one side has (its coverage would be divided by samples it never saw)
    a, b = RegionStats(3), RegionStats(3)
    k = torch.tensor([1, 1, 2, 2])
    a.update({"full": k, "maps": k}, k - 1, k - 1)
    b.update(k, k - 1, k - 1)
    with pytest.raises(ValueError, match="maps"):
        a.merge(b)
    # the same setup spelled differently (a name / a one-name list, a tuple, a slice through a state dict) merges
    a = build(x[:100], y[:100], granularities={"h": "1", "t": ("1", "3"), "s": slice(-1, None)})
    b = build(x[100:], y[100:], granularities={"h": ["1"], "t": ["1", "3"], "s": slice(-1, None)})
    a.merge(RegionStats.from_state_dict(pickle.loads(pickle.dumps(b.state_dict()))))
    whole = build(x, y, granularities={"h": "1", "t": ("1", "3"), "s": slice(-1, None)})
    for g in ("full", "h", "t", "s"):
        assert _by_key(a, g) == _by_key(whole, g)


def test_float_bool_and_complex_labels_are_refused():
    """float labels were cast to int64: sigmoid probabilities as y_pred all became class 0 (accuracy 0.25 here
    where logit > 0 is right on every sample)."""
    logit = torch.tensor([2.0, 3.0, -1.0, 4.0])
    y_true = torch.tensor([1, 1, 0, 1])
    keys = torch.tensor([7, 7, 8, 9])
    s = RegionStats(2)
    with pytest.raises(TypeError, match=r"y_pred .*float32.*argmax\(1\)"):
        s.update(keys, y_true, torch.sigmoid(logit))
    with pytest.raises(TypeError, match="y_true"):
        s.update(keys, y_true.double(), y_true)
    with pytest.raises(TypeError, match="y_pred .*bool"):
        s.update(keys, y_true, logit > 0)
    with pytest.raises(TypeError, match="y_true .*complex"):
        s.update(keys, y_true.to(torch.complex64), y_true)
    assert s.n_samples == 0 and not s.tables
    s.update(keys, y_true.int(), (logit > 0).long())  # integer tensors of any width are class indices
    assert s.accuracy == float(((logit > 0).long() == y_true).float().mean()) == 1.0


def test_inputs_contributions_and_weights_need_one_row_per_key():
    """inputs / contributions / weights were reshaped to the batch size instead of checked: x.T gave scrambled
    region means, 4 rows for 2 keys a (1, 6) mean input."""
    keys, y = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    s = RegionStats(2, keep_inputs=True, keep_contributions=True)
    with pytest.raises(ValueError, match=r"inputs of shape \(3, 4\).*batch size 4"):
        s.update(keys, y, y, inputs=x.T)
    with pytest.raises(ValueError, match=r"inputs of shape \(4, 3\).*batch size 2"):
        s.update(keys[:2], y[:2], y[:2], inputs=x)
    with pytest.raises(ValueError, match=r"contributions of shape \(4, 1, 3\).*batch size 2"):
        s.update(keys[:2], y[:2], y[:2], contributions=torch.ones(4, 1, 3))
    with pytest.raises(ValueError, match=r"weights of shape \(4, 1, 3\).*batch size 2"):
        s.update(keys[:2], y[:2], y[:2], weights=torch.ones(4, 1, 3))
    with pytest.raises(ValueError, match="4 features per sample, the earlier batches 3"):
        s.update(keys, y, y, inputs=x).update(keys, y, y, inputs=torch.ones(4, 4))
    assert s.n_samples == 4 and s.top_contributor is None
    torch.testing.assert_close(s.mean_inputs(), torch.stack([x[:2].mean(0), x[2:].mean(0)]).double())


def test_a_rejected_recorded_batch_adds_no_unit_counts(setup):
    """update_from_recording added the batch's unit counts before the labels were checked: after a rejected batch
    unit_samples no longer matched n_samples and the activation frequencies mixed in the rejected samples."""
    model, x, y = setup
    s = RegionStats(3)
    with rr.record(model) as rec:
        out = model(x[:10])
        with pytest.raises(ValueError, match="y_true"):
            s.update_from_recording(rec, y[:10] + 3, out.argmax(1))
        assert s.n_samples == 0 and s.unit_samples == {} and s.unit_active == {} and not s.tables
        rec.clear()
        out = model(x[10:14])
        s.update_from_recording(rec, y[10:14], out.argmax(1))
    pre = model[0](x[10:14])  # independent: the first hidden layer's pre-activations
    freq = s.activation_frequencies()
    torch.testing.assert_close(freq["1"], (pre > 0).double().mean(0))
    assert set(s.unit_samples.values()) == {4}


def test_empty_batches_add_nothing():
    """An empty batch with inputs or contributions failed in torch's reshape ("cannot reshape tensor of 0
    elements into shape [0, -1]")."""
    e = torch.zeros(0, dtype=torch.long)
    keys, y = torch.tensor([3, 3, 5]), torch.tensor([0, 1, 1])
    x = torch.randn(3, 4)
    s = RegionStats(3, keep_inputs=True, keep_contributions=True)
    s.update(e, e, e, inputs=torch.zeros(0, 4), contributions=torch.zeros(0, 3, 4), weights=torch.zeros(0, 3, 4))
    s.update({"full": e, "maps": e}, e, e, inputs=torch.zeros(0, 2, 2))
    assert s.n_samples == 0 and not s.tables and s.top_contributor is None and "maps" not in s.granularities
    s.update(keys, y, y, inputs=x, contributions=x[:, None].expand(3, 3, 4))
    ref = RegionStats(3, keep_inputs=True, keep_contributions=True)
    ref.update(keys, y, y, inputs=x, contributions=x[:, None].expand(3, 3, 4))
    assert _by_key(s) == _by_key(ref) and torch.equal(s.mean_inputs(), ref.mean_inputs())
    assert torch.equal(s.top_contributor, ref.top_contributor)
    assert affine_map_keys(torch.zeros(0, 2, 4), torch.zeros(0, 2)).shape == (0,)


def test_an_integer_layer_index_out_of_range_names_the_recorded_layers():
    model = mlp(4, [6], 3)
    x, y = torch.randn(5, 4), torch.zeros(5, dtype=torch.long)
    with rr.record(model) as rec:
        model(x)
        for call in (lambda: rec.region_ids(3), lambda: rec.packed(-2),
                     lambda: RegionStats(3, granularities={"g": 3}).update_from_recording(rec, y, y)):
            with pytest.raises(IndexError, match=r"layer index -?\d+ is out of range; recorded layers are \['1'\]"):
                call()
        assert torch.equal(rec.region_ids(-1), rec.region_ids(0)) and torch.equal(rec.region_ids(0), rec.region_ids())


def test_region_keys_are_in_row_order_new_keys_of_a_batch_ascending():
    # (documentation fix, behaviour pinned: rows are not in the order of first appearance within a batch)
    s = RegionStats(3)
    s.update(torch.tensor([30, 10, 20, 30]), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 0]))
    s.update(torch.tensor([40, 5, 10]), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    assert s.region_keys().tolist() == [10, 20, 30, 5, 40]
    assert s.sizes().tolist() == [2, 1, 2, 1, 1]


def test_affine_map_keys_refuse_values_beyond_int64():
    """Rounded entries of 2**63 or more saturated in the int64 cast: different maps got one key (decimals=20
    here; entries 2e7 and 3e7 at decimals=12)."""
    A = torch.tensor([[[1.0, 2.0]], [[3.0, -5.0]], [[0.5, 7.0]]])
    d = torch.tensor([[0.1], [0.2], [0.3]])
    assert len(set(affine_map_keys(A, d, decimals=18).tolist())) == 3
    with pytest.raises(ValueError, match="decimals=20 .*int64"):
        affine_map_keys(A, d, decimals=20)
    with pytest.raises(ValueError, match="decimals=12"):
        affine_map_keys(torch.tensor([[[2e7]], [[3e7]]]), torch.zeros(2, 1), decimals=12)
    with pytest.raises(ValueError, match="int64"):
        affine_map_keys(A, d, decimals=400)  # (10.0 ** 400 overflows a float)
    with pytest.raises(ValueError, match="non-finite"):
        affine_map_keys(A, torch.tensor([[0.1], [float("nan")], [0.3]]))
    with pytest.raises(TypeError, match="decimals"):
        affine_map_keys(A, d, decimals=2.5)
    # at the edge: 9.2e18 < 2**63 still fits, and equal maps keep equal keys
    keys = affine_map_keys(torch.tensor([[[9.2]], [[9.2]], [[-9.2]]]), torch.zeros(3, 1), decimals=18)
    assert keys[0] == keys[1] != keys[2]


def test_every_batch_gives_the_same_parts():
    """Means and shares divide by every batch's samples: a granularity, or kept inputs / contributions, given with
    some batches only made them wrong without a word (coverage 0.5 where it is 1.0; means of inputs over samples
    whose inputs were never added). Refused now, as are float keys (truncated before) and contributions of
    1 < K < n_classes outputs (the top contributor was read at a clamped row)."""
    s = RegionStats(3, keep_inputs=True)
    k = torch.tensor([1, 2, 1])
    y = torch.tensor([0, 1, 2])
    x = torch.randn(3, 4)
    s.update({"a": k, "b": k}, y, y, inputs=x)
    before = s.state_dict()
    with pytest.raises(ValueError, match=r"keys hold the granularities \['a'\]; the earlier batches held \['a', 'b'\]"):
        s.update({"a": k}, y, y, inputs=x)
    with pytest.raises(ValueError, match="inputs were given with the earlier batches and are not with this one"):
        s.update({"a": k, "b": k}, y, y)
    with pytest.raises(TypeError, match=r"keys\['a'\] must hold integer region keys"):
        s.update({"a": k.double(), "b": k}, y, y, inputs=x)
    assert _same_state(before, s.state_dict())
    s.update({"a": k, "b": k}, y, y, inputs=x)
    assert s.coverage(1, "b") == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="K=2 outputs for n_classes=3"):
        RegionStats(3).update(k, y, y, contributions=torch.randn(3, 2, 4))


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_merge_refuses_inputs_or_contributions_kept_on_one_side_only():
    """Before: a.merge(b), where only b's batches carried inputs (contributions), divided b's sums by both sides'
    counts: mean_inputs 3.0 ((5 + 7) / 4) where the inputs known give 6.0; update() refused the same mix."""
    k, yt = torch.tensor([7, 7, 7, 7]), torch.tensor([0, 1, 0, 0])
    x = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    for flag, arg in (("keep_inputs", "inputs"), ("keep_contributions", "contributions")):
        a = RegionStats(2, **{flag: True}).update(k[:2], yt[:2], yt[:2])
        b = RegionStats(2, **{flag: True}).update(k[2:], yt[2:], yt[2:], **{arg: x[2:]})
        before = a.state_dict()
        with pytest.raises(ValueError, match=rf"\['{arg}'\] of granularity 'full' were given with the batches of one"):
            a.merge(b)
        assert _same_state(before, a.state_dict())  # refused before anything was merged
        with pytest.raises(ValueError, match=arg):
            b.merge(a)  # (the other way round too)
    # given on both sides: the hand mean of all four inputs
    a = RegionStats(2, keep_inputs=True).update(k[:2], yt[:2], yt[:2], inputs=x[:2])
    a.merge(RegionStats(2, keep_inputs=True).update(k[2:], yt[2:], yt[2:], inputs=x[2:]))
    assert a.mean_inputs().tolist() == [[(1 + 3 + 5 + 7) / 4]]


def test_merge_refuses_a_table_on_one_side_and_coverage_divides_by_the_tables_samples():
    """Before: a granularity whose table only one side held merged silently, and coverage() divided its table's
    covered samples by every sample of both sides (0.5 where each class lies in one region: 1.0)."""
    yt = torch.tensor([0, 0, 1, 1])
    full, g = torch.tensor([1, 1, 2, 2]), torch.tensor([5, 5, 6, 6])
    a = RegionStats(2, granularities={"g": "layer"}).update({"full": full, "g": g}, yt, yt)
    b = RegionStats(2, granularities={"g": "layer"}).update(full, yt, yt)  # only the default keys (a first batch)
    before = a.state_dict()
    with pytest.raises(ValueError, match=r"granularities \['full', 'g'\], the other \['full'\]"):
        a.merge(b)
    assert _same_state(before, a.state_dict())
    # a state such a merge left (8 samples, g's table holding 4): coverage reads g's own table
    st = a.state_dict()
    st["n_samples"], st["n_correct"] = 8, 8
    st["tables"]["full"] = RegionStats(2).update(torch.cat([full, full]), torch.cat([yt, yt]),
                                                 torch.cat([yt, yt])).state_dict()["tables"]["full"]
    old = RegionStats.from_state_dict(st)
    # by hand: class 0 lies in region 5, class 1 in region 6, each its class's largest region
    assert old.coverage(1, "g") == 1.0 and old.coverage(1, "full") == 1.0
    assert old.summary()["overview"]["top1_coverage"].tolist() == [1.0, 1.0]


def test_ad_hoc_granularity_keys_are_never_filled_from_a_recording(setup):
    """Before: update({"full": ..., "maps": affine_map_keys(...)}) registered "maps" as all layers (None), and a
    later update_from_recording filled it with full-pattern keys: its map count mixed two kinds of keys."""
    from relu_regions.regions import EXTERNAL

    model, x, y = setup
    x, y = x[:40], y[:40]
    amap = rr.affine_map(model, x)
    maps = affine_map_keys(amap.A, amap.d)
    s = RegionStats(3)
    with rr.record(model) as rec:
        out = model(x)
    s.update({"full": rec.region_ids(), "maps": maps}, y, out.argmax(1))
    assert s.granularities["maps"] is EXTERNAL
    before = s.state_dict()
    with rr.record(model) as rec:
        model(x)
        with pytest.raises(ValueError, match=r"granularities \['maps'\] hold keys passed to update\(\)"):
            s.update_from_recording(rec, y, out.argmax(1))
    assert _same_state(before, s.state_dict())
    # independent count: distinct rounded (A, d) rows
    flat = torch.cat([amap.A.reshape(40, -1), amap.d.reshape(40, -1)], 1).double()
    assert s.n_regions("maps") == len({tuple(r) for r in torch.round(flat * 1e6).long().tolist()})
    # the marker survives state dicts (also torch.load(weights_only=True)), pickling and copying
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    for r in (RegionStats.from_state_dict(torch.load(buf, weights_only=True)), pickle.loads(pickle.dumps(s))):
        assert r.granularities["maps"] is EXTERNAL and r.n_regions("maps") == s.n_regions("maps")
        with pytest.raises(ValueError, match="maps"):
            r.batch_patterns(rec)
        r.merge(RegionStats(3).update({"full": rec.region_ids(), "maps": maps}, y, out.argmax(1)))
        assert r.n_samples == 80 and r.n_regions("maps") == s.n_regions("maps")
    # a declared all-layers granularity is still filled from recordings
    d = RegionStats(3, granularities={"all": None})
    d.update_from_recording(rec, y, out.argmax(1))
    assert d.n_regions("all") == d.n_regions()


def test_metric_count_options_must_be_positive_ints():
    """Before: coverage(1.5) acted as coverage(2), coverage(0) gave 0.0, to_markdown(max_regions=-1) dropped the
    smallest region and RegionStats(True) made a one-class object."""
    s = RegionStats(3).update(torch.tensor([1, 2, 3, 4, 4]), torch.tensor([0, 0, 0, 1, 1]),
                              torch.tensor([0, 0, 0, 1, 1]))
    assert s.coverage(1) == pytest.approx(3 / 5) and s.coverage(2) == pytest.approx(4 / 5)  # by hand
    for bad in (1.5, 0, -1, True, "2"):
        with pytest.raises(ValueError, match=f"top must be a positive int.*got {bad!r}"):
            s.coverage(bad)
        with pytest.raises(ValueError, match="max_regions must be a positive int"):
            s.to_markdown(max_regions=bad)
    assert RegionStats(3).coverage(2) != RegionStats(3).coverage(2)  # nan: no samples (a valid top)
    with pytest.raises(ValueError, match="n_classes"):
        RegionStats(True)


def test_merging_with_an_empty_object_and_the_settings_merge_checks():
    """Before: once update() had registered a granularity for keys passed to it (EXTERNAL), merging with an object
    without samples (a shard that saw no batch) was refused in both orders; purity_threshold was not compared (the
    merged confusion_share depended on which side received the other); confusion_share(weighted=True) was a float32
    quotient (0.4000000059604645 for 2/5)."""
    from collections import Counter

    k = torch.tensor([1, 2, 2, 5, 9])
    y = torch.tensor([0, 1, 1, 2, 2])
    maps = k % 2

    def full():
        return RegionStats(3).update({"full": k, "maps": maps}, y, y)

    def shard():  # an empty batch through the same call
        return RegionStats(3).update({"full": k[:0], "maps": maps[:0]}, y[:0], y[:0])

    ref = (len(Counter(k.tolist())), len(Counter(maps.tolist())))
    for merged in (full().merge(RegionStats(3)), RegionStats(3).merge(full()), full().merge(shard()),
                   shard().merge(full())):
        assert (merged.n_regions(), merged.n_regions("maps")) == ref and merged.n_samples == 5
    with pytest.raises(ValueError, match="granularities \\['last'\\] are defined on one side only"):
        RegionStats(3, granularities={"last": -1}).merge(RegionStats(3))  # (a configured one: still refused)
    with pytest.raises(ValueError, match="purity_threshold differs"):
        RegionStats(3, purity_threshold=0.5).merge(RegionStats(3, purity_threshold=0.9))
    s = RegionStats(3).update(torch.tensor([1, 1, 2, 2, 2]), torch.tensor([0, 1, 0, 0, 0]),
                              torch.tensor([0, 1, 0, 0, 0]))
    assert s.confusion_share(weighted=True) == 2 / 5  # region 1 (purity 0.5) holds 2 of the 5 samples
