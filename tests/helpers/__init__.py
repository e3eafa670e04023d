"""Helpers shared by test files in different folders (importable as `helpers`: tests/ is on sys.path
through tests/conftest.py). Folder-local helpers stay next to their tests (losses/refs_clip.py,
train/tiny_models.py, eval/fake_clip.py)."""
