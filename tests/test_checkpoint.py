"""Workdirs: where a run may write (ettin_jax.checkpoint)."""
import re

import pytest

from ettin_jax import checkpoint


def test_url_workdir_is_refused_with_the_mount_to_use():
    with pytest.raises(ValueError, match=re.escape("workdir 'gs://my-bucket/runs/1b' is a gs:// URL, but the workdir "
                                                   "is written with local file I/O: mount the bucket on every host "
                                                   "(`gcsfuse --implicit-dirs my-bucket /mnt/my-bucket`) and pass the "
                                                   "mount path, --workdir=/mnt/my-bucket/runs/1b")):
        checkpoint.check_workdir("gs://my-bucket/runs/1b")
    with pytest.raises(ValueError, match="is a s3:// URL"):
        checkpoint.check_workdir("s3://b/x")
    for ok in ("runs/p1", "/mnt/my-bucket/runs/1b", "C:/runs"):
        assert checkpoint.check_workdir(ok) == ok
