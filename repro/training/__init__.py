"""Training: the loops (pretraining, finetuning, checkpoints, DDP) and the jobs that run them over a grid.

Dependencies point one way: the jobs (`prepare`, `trainer`, `grid`, `variants`, `ddp`) import the loops
(`loop`), never back.
"""
