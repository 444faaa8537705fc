"""Operations: the local stack's processes and the long-lived worker that serves a work pool.

Layering (each layer imports only the ones below it): ``silotune`` (the library) ← ``tasks`` ←
``flows`` ← ``ops`` ← the CLI. ``ops`` starts and supervises the servers and workers, and its worker
serves ``flows``' flows; ``flows``, ``tasks`` and ``silotune`` never import ``ops``.
"""
