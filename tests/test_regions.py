import io
import pickle

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
