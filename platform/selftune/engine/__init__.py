"""The engine: the Ray-free training core (``loop``), the worker context, Ray Train at the edge
(``ray_train``) and the driver that runs a pipeline's stages in order (``pipeline``)."""
