"""One run: the job, its plan of blocks, the backends that compute them, and ``run``."""
