"""What `assay model grant` sends: the key of a private image pushed from this state folder, sealed to the named
site's key, which that site alone opens; an image not pushed private from here has no key to give."""

from __future__ import annotations

from pathlib import Path

import pytest

from assay.home import Home
from assay.push import grant, key_file
from contracts.sealing import SealError, new_key, open_key
from contracts.signing import KeyPair

IMAGE = "sha256:" + "4" * 64


def test_a_grant_seals_the_images_key_to_the_site_alone(tmp_path: Path) -> None:
    home = Home(tmp_path)
    site = KeyPair.generate()
    site.save(home.key_file("hospital-a"))
    key = new_key()
    key_file(home, IMAGE).parent.mkdir(parents=True)
    key_file(home, IMAGE).write_bytes(key)

    command = grant(home, IMAGE, "hospital-a")

    assert (command.image, command.site_id) == (IMAGE, "hospital-a")
    assert open_key(command.sealed_key, site) == key
    with pytest.raises(SealError):
        open_key(command.sealed_key, KeyPair.generate())


def test_an_image_not_pushed_private_from_here_has_no_key_to_give(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="assay model push IMAGE --private"):
        grant(Home(tmp_path), IMAGE, "hospital-a")
