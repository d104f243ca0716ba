"""Tests of charlm.infer: sampling and beam search."""
