"""Test helpers shared by unit and integration tests: tiny real models built offline, and their pytest fixtures."""
