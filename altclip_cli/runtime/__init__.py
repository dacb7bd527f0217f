"""The runtime: device and precision policy (device.py), building the network from a model folder
(build.py), a loaded model with `load` (altclip.py), the model-facing layer it shares with a
server's model (embedder.py), and embed's rows (rows.py).
Importing the package itself is cheap; `altclip_cli.load` imports the rest on first use."""
