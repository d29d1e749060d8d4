"""The trainer service: long-running training jobs (`pyacemaker.v1.TrainerService`) that outlive the client
that started them and the trainer process itself.

`server.py` is the thin servicer, `jobs.py` the durable job table and the worker processes, `worker.py` the
process that runs one job. The science: `mace_finetune.py` (step 3, the MACE committee), `ace_fit.py` (step 6,
the base ACE; `linear_ace.py` holds the linear-ACE machinery), `delta.py` (step 7), `pacemaker_nonlinear.py`
(the optional TensorFlow path) and `evaluation.py` (errors, parity data and γ of any potential on a dataset).
"""
