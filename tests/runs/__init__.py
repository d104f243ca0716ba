"""Tests of charlm.runs: run directories and records, the console."""
