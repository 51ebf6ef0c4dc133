"""The Dask worker plugin that builds a run's model once per worker (its own module: importing
``distributed`` costs 0.2 s, which a run on ``backend=local`` does not pay)."""

from __future__ import annotations

import torch
from distributed.diagnostics.plugin import WorkerPlugin

from ...errors import PipelineError
from ...hessian.allocator import keep_for_good
from ...hessian.methods import METHODS
from ...hessian.targets import Target
from .dask_worker import _WORKER_MODELS, _worker_model


class ModelPlugin(WorkerPlugin):
    """A Dask worker plugin that builds the model once per worker."""

    name = "pipeline-model"

    def __init__(self, *model_args, warm_up=None):
        self.args = model_args  # see _worker_model
        self.warm_up = warm_up  # (method, x of one sample, target kind, aux, output_index)

    def setup(self, worker) -> None:
        keep_for_good()  # for the worker's life (see NOTE: [malloc in Dask workers])
        try:
            model = _worker_model(*self.args)
        except PipelineError:  # every task raises it again, and the run reports it once (a
            return  # raise here would be logged with a traceback by each worker)
        if self.warm_up is not None:  # first torch.func calls in a process take ~1-2 s
            method, x, kind, aux, oi = self.warm_up
            device = next(iter(model.parameters()), torch.empty(0)).device
            target = Target(kind, torch.as_tensor(aux), oi).to(device)
            rows = torch.arange(min(2, x[0].size), device=device)
            METHODS[method].compute(model, torch.as_tensor(x).to(device), target, rows, 1 << 26)

    def teardown(self, worker) -> None:
        _WORKER_MODELS.clear()
