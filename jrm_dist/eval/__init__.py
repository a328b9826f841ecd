"""Benchmark protocols (EditReward-Bench EditScore/TIGER releases, MMRB2) and representation analysis.

Readers take the released file layouts; scoring (``common.Scorer``) is separate from the protocol
arithmetic (pure functions in each module), so results can be re-scored from the saved JSON.
"""
