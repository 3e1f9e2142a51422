"""Batch plans: what is shared, what is read, and that every text is covered once."""

from acteng.batching import plan_batches


def test_global_prefix_groups_and_suffixes() -> None:
    # Two pairs: template [1, 2], prompts [5, 6] and [7], completions differ.
    texts = [[1, 2, 5, 6, 10], [1, 2, 5, 6, 11, 12], [1, 2, 7, 13], [1, 2, 7, 14]]
    shareable = [4, 4, 3, 3]
    reads = [4, 4, 3, 3]
    global_ids, plans = plan_batches(texts, shareable, reads, batch_size=8)
    assert global_ids == [1, 2]
    (plan,) = plans
    assert sorted(plan.texts) == [0, 1, 2, 3]
    assert sorted(map(tuple, plan.keys)) == [(5, 6), (7,)]
    for row, text in enumerate(plan.texts):
        key = plan.keys[plan.group_of_row[row]]
        assert global_ids + key + plan.suffixes[row] == texts[text]
        assert plan.offsets[row] == len(global_ids) + len(key)


def test_nothing_read_is_ever_cached() -> None:
    texts = [[1, 2, 3], [1, 2, 4]]
    global_ids, plans = plan_batches(texts, [0, 0], [0, 0], batch_size=1)
    assert global_ids == []
    assert [p.suffixes for p in plans] == [[[1, 2, 3]], [[1, 2, 4]]]
    global_ids, _ = plan_batches(texts, [2, 2], [1, 2], batch_size=4)
    assert global_ids == [1]  # text 0 is read from token 1 on


def test_batches_respect_size_and_keep_groups_whole() -> None:
    texts = [[9, i, j] for i in range(5) for j in (20, 21)]
    _, plans = plan_batches(texts, [2] * 10, [2] * 10, batch_size=3)
    assert all(len(p.texts) <= 3 for p in plans)
    assert sorted(t for p in plans for t in p.texts) == list(range(10))
    for p in plans:
        assert len(p.keys) * 2 == len(p.texts)
