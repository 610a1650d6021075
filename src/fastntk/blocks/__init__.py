"""Blocks: one engine computes every kernel block by block within one memory model.

    budget.py    what a block holds, and the block size that fits ``max_memory``
    schedule.py  which blocks, in which order, split between ranks; the factor cache
    engine.py    calibration on the first block, then the blocks, each reduced and checked
"""
