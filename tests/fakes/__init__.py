"""Test fakes, one of each kind: libvirt (:mod:`.libvirt`), key manager (:mod:`.keymgr`),
host probe (:mod:`.probe`). Unit tests import them from here, never from each other."""
