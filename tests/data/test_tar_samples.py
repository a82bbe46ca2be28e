import glob
import os

import pytest
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from megatron_p2t.data.tar_samples import TarFormatError, iter_samples, read_shard


def _webdataset(url):
    return list(group_by_keys(tar_file_expander(url_opener([{"url": url}]))))


def test_same_samples_as_webdataset_on_built_shards(built_sample):
    out, _ = built_sample
    for p in sorted(glob.glob(os.path.join(out, "shards", "*.tar"))):
        assert list(iter_samples(read_shard(p), p)) == _webdataset(p)


def test_same_samples_as_webdataset_on_a_tarwriter_shard(tmp_path):
    """Shards written by webdataset itself (pax headers for long or non-ASCII names) read the same."""
    p = str(tmp_path / "w.tar")
    with TarWriter(p) as w:
        w.write({"__key__": "short", "seq": b"MKV", "txt": b"x"})
        w.write({"__key__": "dir/" + "k" * 150, "seq": b"MKVL", "txt": "défini".encode()})
        w.write({"__key__": "données_ü", "seq": b"", "txt": b"y" * 3000})
    assert list(iter_samples(read_shard(p), p)) == _webdataset(p)


def test_damage_is_reported(built_sample):
    out, _ = built_sample
    p = sorted(glob.glob(os.path.join(out, "shards", "train-*.tar")))[0]
    data = bytearray(read_shard(p))
    with pytest.raises(TarFormatError, match="truncated"):
        list(iter_samples(bytes(data[:5000]), p))
    data[101] ^= 0x01  # the first header's mode field
    with pytest.raises(TarFormatError, match="checksum at byte 0"):
        list(iter_samples(bytes(data), p))
