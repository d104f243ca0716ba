"""Tests of charlm.data: the data package."""
