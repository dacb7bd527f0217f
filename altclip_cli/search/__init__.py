"""Search over one's own images: an index per model (store.py) that `altclip index` keeps up to
date by walking folders (walk.py, update.py), and the ranking of its vectors against a query.

Cheap to import: the modules here import numpy, PIL and torch inside the functions that need them.
"""
