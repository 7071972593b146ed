"""GQC inside the frameworks users train through: each module adapts one framework's loop to the
decision API (``GQCOptimizerWrapper.after_backward`` / ``step(closure)``), needs that framework's
extra (``pip install 'gqc_dist[hf]'``, ``[lightning]``, ``[torchtitan]``) and pins the releases
it was tested on. Importing this package imports no framework."""
