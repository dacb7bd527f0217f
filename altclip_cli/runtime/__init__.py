"""The runtime: device and precision policy (device.py), thread planning (threads.py), building
the network from a model folder (build.py), and a loaded model with `load` (altclip.py).
Importing the package itself is cheap; `altclip_cli.load` imports the rest on first use."""
