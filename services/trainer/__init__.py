"""The trainer service (MACE fine-tuning, base ACE fit, delta learning).

Its contract is protos/pyacemaker/v1/trainer.proto; the service itself arrives with the trainer issue.
"""
