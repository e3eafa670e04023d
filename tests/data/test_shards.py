from clipdistill.data.shards import SkipCounter, dataset_info, iter_samples


def test_classification_reader_skips_corrupt_jpeg(make_dataset):
    root = make_dataset("toy", n=6, corrupt=(2,), gz=True, shards=2)
    info = dataset_info("toy", root)
    skipped = SkipCounter()
    samples = list(iter_samples(info.shards("test"), skipped=skipped))
    assert [s.key for s in samples] == ["s0000000", "s0000001", "s0000003", "s0000004", "s0000005"]
    assert skipped.reasons == {"undecodable image": 1}
    assert [s.label for s in samples] == [0, 1, 1, 0, 1]


def test_caption_reader_skips_sample_without_caption(make_dataset):
    root = make_dataset("caps", kind="retrieval", n=4, no_caption=(1,))
    info = dataset_info("caps", root)
    skipped = SkipCounter()
    samples = list(iter_samples(info.shards("test"), skipped=skipped))
    assert [s.key for s in samples] == ["s0000000", "s0000002", "s0000003"]
    assert samples[0].captions == ["caption 0 one", "caption 0 two"]
    assert skipped.reasons == {"no label or caption": 1}
    one = list(iter_samples(info.shards("test"), caption="random"))
    assert all(len(s.captions) == 1 for s in one)
