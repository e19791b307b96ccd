"""Shipped model folders on a node: the cache is private to the user and a copy
found there is re-verified against the driver's sha256s, never trusted by its name; local
outputs are staged under unpredictable names."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest

from workflows import transfer


@pytest.fixture()
def model_folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\x01" * 4096)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (folder / "sub" / "extra.json").write_text("{}")
    return folder


@pytest.mark.ray
def test_a_planted_or_changed_cache_copy_is_never_used(ray_local, model_folder, tmp_path,
                                                        monkeypatch):
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(node_tmp))
    shipped = transfer.ship_folder(model_folder, origin="models:/m/1")

    # Someone plants the digest's folder, complete with its marker, before the first use.
    root = transfer.shipped_cache_root()
    assert root == node_tmp / f"bertflow-shipped-{os.getuid()}"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and root.stat().st_uid == os.getuid()
    planted = root / shipped.digest[:32]
    (planted / "sub").mkdir(parents=True)
    (planted / "model.safetensors").write_bytes(b"\x02" * 4096)  # other weights
    (planted / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (planted / "sub" / "extra.json").write_text("{}")
    (planted / ".bertflow-complete").write_text(shipped.digest)
    got = shipped.materialize()
    assert got == planted and (got / "model.safetensors").read_bytes() == b"\x01" * 4096

    # A hit is checked each time: changed bytes, an added file or a link are replaced.
    (got / "vocab.txt").write_text("[PAD]\n[UNK]\nevil\n")
    assert (shipped.materialize() / "vocab.txt").read_text() == "[PAD]\n[UNK]\nhello\n"
    (got / "tokenizer.json").write_text("{}")
    assert not (shipped.materialize() / "tokenizer.json").exists()
    (got / "sub" / "extra.json").unlink()
    (got / "sub" / "extra.json").symlink_to("/etc/passwd")
    assert not (shipped.materialize() / "sub" / "extra.json").is_symlink()
    assert shipped.check_copy(shipped.materialize()) is None


def test_a_cache_folder_others_can_enter_or_a_link_is_refused(tmp_path):
    open_root = tmp_path / "open"
    open_root.mkdir(mode=0o755)
    os.chmod(open_root, 0o755)
    with pytest.raises(transfer.TransferError, match="mode 0755"):
        transfer.shipped_cache_root(open_root)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(transfer.TransferError, match="symbolic link"):
        transfer.shipped_cache_root(link)
    if os.getuid() == 0:  # as root, a folder another user owns can be made
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(transfer.TransferError, match="owner uid 65534"):
            transfer.shipped_cache_root(theirs)


def test_a_staged_local_output_has_an_unpredictable_name_and_usual_mode(tmp_path):
    out = tmp_path / "preds.csv"
    with transfer.staged_output(str(out)) as tmp:
        assert tmp.parent == tmp_path and tmp.name != f".preds.csv.tmp-{os.getpid()}"
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600  # nobody reads it half-written
        tmp.write_text("a\n")
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.read_text() == "a\n" and stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
