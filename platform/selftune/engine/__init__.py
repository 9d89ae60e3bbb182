"""The engine: the Ray-free training core (``loop``: ``fit`` with hooks), the worker context, the
Ray instance (``cluster``) and Ray Train at the edge (``ray_train``). It knows nothing of stages."""
