"""altclip's own caches, under `altclip_home()`: weights stored in the compute dtype (weights.py),
label embeddings (labels.py), and what `altclip cache` lists and clears (inventory.py).
ALTCLIP_NO_CACHE=1 turns the first two off. Importing the package itself is cheap."""
