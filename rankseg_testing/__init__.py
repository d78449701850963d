"""Test helpers that are not part of the installed package (local servers, fakes)."""
