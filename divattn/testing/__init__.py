"""Test helpers that ship with divattn (pytest plugins)."""
