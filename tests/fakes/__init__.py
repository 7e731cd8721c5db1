"""Test fakes, one of each kind: libvirt (:mod:`.libvirt`), key manager (:mod:`.keymgr`),
host probe (:mod:`.probe`), the server backend under the service (:mod:`.service`).
Unit tests import them from here, never from each other."""
