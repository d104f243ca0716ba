"""Tests of charlm.nn: the network package."""
