"""The image library and its trust chain: the verified, content-addressed library of base images
(``library``), endorsed catalogs and their signatures (``catalog``), syncing a catalog over HTTP
(``sync``, ``fetch``), qcow2 overlays (``qemuimg``) and the site's policy of who may use which
image (``policy``).

May import: ``vibatch.config``, ``errors``, ``names``, ``util``, ``safeio``, ``proc``. Never the
job core, the VM layer, the batch adapters or the commands.
"""
