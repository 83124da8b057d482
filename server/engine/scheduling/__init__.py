"""Who runs next, counted in tokens; it holds no tensors and imports no torch.

  scheduler.py       the waiting and running queues; admission (and preemption) under the batch and
                     prefill limits, asking the worker whether memory allows (ADMIT / DEFER / STOP)
  fair_share.py      the order between tenants: the least served tenant per unit of weight first
  chunk_budget.py    how many prompt tokens the paged path's next step may compute, from measured step times

May import: server.engine.config, types, errors, request.sequence. Never torch, the paths or the loop.
"""
