"""The micro-step chain, engine- and framework-agnostic: local sums of the gradient pieces
(``grad_norms``, ``reduction``) -> one packed all-reduce (``packet``, ``collectives``) -> the
global statistics (``micro_step``, ``noise_scale``, ``local_mode``) -> the decision and the step
(``wrapper``, ``rules``, ``window``). Engine adapters live in ``gqc_dist.engines``, front ends in
``gqc_dist.frontends``, decision rules in ``gqc_dist.algorithms``."""
