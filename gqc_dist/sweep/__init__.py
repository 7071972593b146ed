"""``gqc-train sweep``: a fair A/B sweep of GQC against fixed accumulation on the user's own job.

Layers, one way: :mod:`.spec` (the spec file, checked) -> :mod:`.runs` (one run: command,
process, record or failure) -> :mod:`.local` / :mod:`.slurm` (where runs execute) ->
:mod:`.table` and :mod:`.report` (what the kept records say). :mod:`.records` is the one small
JSON per run, and what a user's own training script calls to write it::

    from gqc_dist.sweep import RunRecorder
    recorder = RunRecorder()
    ...                                   # after every optimizer step:
    recorder.observe(optimizer)           # the GQC wrapper: its window and noise scale
    recorder.write(out_dir, val_loss=final_loss, tokens=tokens_seen)
"""

from gqc_dist.sweep.records import RunRecorder, write_result

__all__ = ["RunRecorder", "write_result"]
