"""Code shared by the tests (no tests here): the in-process CLI runner, synthetic adapters and dense references,
reference segmenters, tiny study configs. conftest.py hands these out as fixtures; test modules never import
from one another."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root, so tests name shipped files (configs/, README.md) by absolute path whatever the cwd."""
